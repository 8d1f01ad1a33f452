//! The link to the node agent's `ServingService`: the pod's batch limit
//! and drain flag in (`WatchLimits`), the proxy's cumulative statistics out
//! (`ReportEngineStats`, every `--report-interval` and at once when a drain
//! starts or the proxy becomes empty).
//!
//! Both calls are retried with backoff (100 ms doubling to 5 s) for as
//! long as the proxy runs; while the agent is away the last limit and
//! drain flag stay in force and the counters keep counting (they travel
//! cumulative, so the next report carries everything).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use gpuscale_core::{PodRef, ServingAddr};
use gpuscale_proto::v1;
use gpuscale_proto::v1::serving_service_client::ServingServiceClient;
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tracing::{debug, info, warn};

use super::Shared;
use crate::admission::Limit;
use crate::error::ProxyError;

pub(crate) const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// A lazily connecting channel to the agent (it reconnects by itself).
pub(super) fn channel(addr: &ServingAddr) -> Result<Channel, ProxyError> {
    let bad = |e: tonic::transport::Error| ProxyError::config("--agent", addr, e.to_string());
    match addr {
        ServingAddr::Tcp(a) => Ok(Endpoint::from_shared(format!("http://{a}"))
            .map_err(bad)?
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy()),
        ServingAddr::Unix(path) => {
            let path = path.clone();
            Ok(Endpoint::from_static("http://localhost")
                .connect_timeout(Duration::from_secs(2))
                .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                })))
        }
    }
}

fn wire_pod(pod: &PodRef) -> v1::PodRef {
    v1::PodRef::from(pod)
}

pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Sleeps the next backoff step unless stopped first; false when stopped.
pub(crate) async fn backoff(delay: &mut Duration, stop: &mut watch::Receiver<bool>) -> bool {
    let d = *delay;
    *delay = (*delay * 2).min(BACKOFF_CAP);
    tokio::select! {
        () = stopped(stop) => false,
        () = tokio::time::sleep(d) => true,
    }
}

impl Shared {
    fn apply_limits(self: &Arc<Self>, msg: &v1::EngineLimits) {
        match msg.batch_limit {
            Some(0) => warn!("the agent sent batch limit 0: ignored, the current limit stays"),
            Some(n) => self.set_limit(Limit::At(n)),
            None => self.set_limit(self.config.default_limit),
        }
        self.agent_draining.store(msg.draining, Ordering::SeqCst);
        self.update_drain();
    }

    /// The stats message: cumulative counters and histograms, and the
    /// admission's queue (waiting) and in-flight (running) requests.
    fn engine_stats(&self, pod: &PodRef) -> v1::EngineStats {
        let t = self.stats.totals();
        let load = self.admission.load();
        v1::EngineStats {
            pod: Some(wire_pod(pod)),
            model: self.config.model.clone(),
            requests_waiting: Some(load.queued as f64),
            requests_running: Some(f64::from(load.in_flight)),
            prompt_tokens_total: Some(t.prompt_tokens as f64),
            generation_tokens_total: Some(t.generation_tokens as f64),
            requests_arrived_total: Some(t.arrived as f64),
            requests_finished_total: Some((t.finished + t.failed + t.client_gone) as f64),
            ttft_seconds: Some(v1::Histogram::from(&t.ttft)),
            tpot_seconds: Some(v1::Histogram::from(&t.tpot)),
            batch_limit: load.limit.as_option().filter(|n| *n > 0),
            ..v1::EngineStats::default()
        }
    }
}

/// Follows the pod's limits for as long as the proxy runs.
pub(super) async fn watch_limits(
    shared: Arc<Shared>,
    channel: Channel,
    pod: PodRef,
    mut stop: watch::Receiver<bool>,
) {
    let mut client = ServingServiceClient::new(channel);
    let mut delay = BACKOFF_BASE;
    let mut logged_down = false;
    loop {
        let follow = async {
            let mut stream = client
                .watch_limits(v1::WatchLimitsRequest {
                    pod: Some(wire_pod(&pod)),
                })
                .await?
                .into_inner();
            while let Some(msg) = stream.message().await? {
                if !shared.agent_connected.swap(true, Ordering::SeqCst) {
                    info!(pod = %pod, "following the batch limit from the agent");
                }
                logged_down = false;
                delay = BACKOFF_BASE;
                shared.apply_limits(&msg);
            }
            Ok::<(), tonic::Status>(())
        };
        let ended = tokio::select! {
            () = stopped(&mut stop) => return,
            r = follow => r,
        };
        shared.agent_connected.store(false, Ordering::SeqCst);
        match ended {
            Ok(()) => info!("the agent ended the WatchLimits stream: subscribing again"),
            Err(e) if !logged_down => {
                warn!(code = ?e.code(), error = %e.message(),
                    "cannot follow the batch limit from the agent: retrying; the current limit stays");
                logged_down = true;
            }
            Err(e) => debug!(error = %e, "WatchLimits failed again"),
        }
        if !backoff(&mut delay, &mut stop).await {
            return;
        }
    }
}

/// Reports the stats for as long as the proxy runs, and once more at the end.
pub(super) async fn report_stats(
    shared: Arc<Shared>,
    channel: Channel,
    pod: PodRef,
    mut stop: watch::Receiver<bool>,
) {
    let mut client = ServingServiceClient::new(channel);
    let mut delay = BACKOFF_BASE;
    let mut logged_down = false;
    loop {
        let (tx, rx) = mpsc::channel(4);
        let call = client.report_engine_stats(ReceiverStream::new(rx));
        tokio::pin!(call);
        let ended = loop {
            // Full means the transport is behind: the next message carries
            // the totals anyway.
            let _ = tx.try_send(shared.engine_stats(&pod));
            tokio::select! {
                biased;
                () = stopped(&mut stop) => {
                    let _ = tx.try_send(shared.engine_stats(&pod));
                    drop(tx);
                    let _ = tokio::time::timeout(Duration::from_secs(1), &mut call).await;
                    return;
                }
                r = &mut call => break r,
                () = shared.report_now.notified() => {}
                () = tokio::time::sleep(shared.config.report_interval) => {}
            }
            if logged_down {
                info!("reporting stats to the agent again");
                logged_down = false;
            }
            delay = BACKOFF_BASE;
        };
        match ended {
            Ok(_) => debug!("the agent closed the stats stream: reopening"),
            Err(e) if !logged_down => {
                warn!(code = ?e.code(), error = %e.message(),
                    "cannot report stats to the agent: retrying (counters are cumulative, nothing is lost)");
                logged_down = true;
            }
            Err(e) => debug!(error = %e, "ReportEngineStats failed again"),
        }
        if !backoff(&mut delay, &mut stop).await {
            return;
        }
    }
}
