//! The uplink: one long-lived `AgentService.Report` stream to the scaler.
//!
//! Each stream starts with a full snapshot of the newest sampled state; after
//! that, every newer state goes out as the delta from the last state sent
//! ([`crate::diff`]). The boot epoch is fixed for the process and the
//! sequence number grows by one per message across reconnects.
//!
//! While the scaler is unreachable the sampler keeps sampling; the uplink only
//! ever looks at the newest state (a `watch` channel), so memory stays
//! bounded and every state that was replaced unsent is counted as coalesced.
//! Counters and histograms are cumulative, so nothing is lost but resolution.
//!
//! Failures and what follows:
//! * connect error or timeout, stream reset, `UNAVAILABLE`: retry after the
//!   jittered exponential [`crate::backoff`] delay; the attempt counter resets
//!   once the scaler acknowledges a report on a new stream;
//! * `FAILED_PRECONDITION` (the scaler lost our epoch or saw a gap): reconnect
//!   at once with a snapshot — once; a second one in a row without an
//!   acknowledgement in between backs off like any failure;
//! * `INVALID_ARGUMENT` (the scaler rejected a report): logged as an error
//!   with the scaler's message, then back off and start over with a snapshot.
//!
//! Logging follows the link's state, not attempts: one line when the link
//! comes up, one when it goes down or the kind of failure changes.
//!
//! **Security**: an `https://` scaler is verified against the CA bundle
//! (`--ca-file`, re-read at each connection like everything below) under
//! its URL's host or `--server-name`; the stream carries
//! `authorization: Bearer <token>` from `--token-file` (the kubelet
//! rotates the projected token in place, so it is read again at each
//! connection) and, with `--tls-cert`, a client certificate. The scaler
//! refuses a stream it cannot authenticate (`UNAUTHENTICATED`) or one that
//! reports another node than the credential's (`PERMISSION_DENIED`): both
//! are logged as errors and retried with backoff, as is an expired token
//! (the next connection reads the rotated one).

use gpuscale_core::jitter::Jitter;
use std::sync::Arc;
use std::time::Duration;

use gpuscale_core::Timestamp;
use gpuscale_proto::v1;
use gpuscale_proto::v1::agent_service_client::AgentServiceClient;
use gpuscale_proto::{AgentReport, Directive, ReportBody};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::directives::NodeDirectives;
use crate::metrics::AgentMetrics;
use crate::sampler::Sampled;
use crate::{AgentConfig, Clock, diff};

/// The state of the link to the scaler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkStatus {
    /// No stream opened yet.
    Connecting,
    /// A stream is open.
    Connected,
    /// The last attempt or stream failed; retrying.
    Disconnected { reason: String },
}

impl LinkStatus {
    pub fn is_connected(&self) -> bool {
        matches!(self, LinkStatus::Connected)
    }
}

/// Reports the uplink may have queued towards the transport at once. Small on
/// purpose: states wait in the `watch` channel, where they coalesce.
const OUTBOUND_QUEUE: usize = 2;

pub(crate) struct Uplink {
    pub(crate) config: Arc<AgentConfig>,
    pub(crate) epoch: u64,
    pub(crate) clock: Clock,
    pub(crate) metrics: Arc<AgentMetrics>,
    pub(crate) latest: watch::Receiver<Option<Arc<Sampled>>>,
    pub(crate) directives: watch::Sender<NodeDirectives>,
    pub(crate) interval: watch::Sender<Duration>,
    pub(crate) link: watch::Sender<LinkStatus>,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) seed: u64,
}

/// Why a stream ended, and what to do next.
struct Failure {
    /// Bounded class for the metric label and for logging once per change.
    reason: &'static str,
    detail: String,
    level: FailureLevel,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FailureLevel {
    /// The scaler is away or the stream broke: retry with backoff.
    Transient,
    /// The scaler needs a snapshot: reconnect at once.
    Resync,
    /// The scaler rejected what we sent: an error worth a human's attention.
    Rejected,
}

/// What woke a session up.
enum Event<'a> {
    Shutdown,
    Inbound(Result<Option<v1::ScalerDirective>, tonic::Status>),
    /// A newer state was sampled (false: the sampler is gone).
    Changed(bool),
    /// Room in the outbound queue (None: the transport dropped it).
    Writable(Option<mpsc::Permit<'a, v1::NodeReport>>),
}

enum SessionEnd {
    Shutdown,
    Failed { failure: Failure, acked: bool },
}

/// Where the uplink is between sessions.
struct Progress {
    seq: u64,
    ever_connected: bool,
}

fn code_reason(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument => "invalid_argument",
        Code::FailedPrecondition => "failed_precondition",
        Code::Unavailable => "unavailable",
        Code::ResourceExhausted => "resource_exhausted",
        Code::OutOfRange => "out_of_range",
        Code::Cancelled => "cancelled",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unknown => "unknown",
        Code::PermissionDenied => "permission_denied",
        Code::Unauthenticated => "unauthenticated",
        _ => "other",
    }
}

fn failure_from_status(status: &tonic::Status) -> Failure {
    let level = match status.code() {
        Code::FailedPrecondition => FailureLevel::Resync,
        Code::InvalidArgument
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::PermissionDenied
        | Code::Unauthenticated => FailureLevel::Rejected,
        _ => FailureLevel::Transient,
    };
    Failure {
        reason: code_reason(status.code()),
        detail: status.message().to_string(),
        level,
    }
}

/// A certificate, key or token file, at most 1 MiB
/// ([`gpuscale_core::config_text::MAX_CONFIG_BYTES`]).
fn read_file(path: &std::path::Path, what: &str) -> Result<Vec<u8>, String> {
    crate::config::read_at_most(path, gpuscale_core::config_text::MAX_CONFIG_BYTES)
        .map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// The endpoint of the scaler with TLS as configured; files are read now.
fn endpoint(config: &AgentConfig) -> Result<Endpoint, String> {
    let mut endpoint = Endpoint::from_shared(config.scaler_url.clone())
        .map_err(|e| format!("the scaler URL is not usable: {e}"))?
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let sec = &config.uplink_security;
    if let Some(ca) = &sec.ca_file {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read_file(ca, "--ca-file")?));
        if let Some(name) = &sec.server_name {
            tls = tls.domain_name(name.clone());
        }
        if let Some((cert, key)) = &sec.client_cert {
            tls = tls.identity(Identity::from_pem(
                read_file(cert, "--tls-cert")?,
                read_file(key, "--tls-key")?,
            ));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| format!("TLS configuration: {e}"))?;
    }
    Ok(endpoint)
}

/// The bearer token to send, read from `--token-file` now.
fn bearer(config: &AgentConfig) -> Result<Option<MetadataValue<tonic::metadata::Ascii>>, String> {
    let Some(path) = &config.uplink_security.token_file else {
        return Ok(None);
    };
    let bytes = read_file(path, "--token-file")?;
    let token = String::from_utf8(bytes)
        .map_err(|_| format!("--token-file {}: not UTF-8", path.display()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(format!("--token-file {}: empty", path.display()));
    }
    MetadataValue::try_from(format!("Bearer {token}"))
        .map(Some)
        .map_err(|_| format!("--token-file {}: not a valid header value", path.display()))
}

impl Uplink {
    pub(crate) async fn run(mut self) {
        if let Err(e) = Endpoint::from_shared(self.config.scaler_url.clone()) {
            tracing::error!(url = %self.config.scaler_url, error = %e, "the scaler URL is not usable; the uplink is off");
            return;
        }
        let mut jitter = Jitter::new(self.seed);
        let mut progress = Progress {
            seq: 0,
            ever_connected: false,
        };
        let mut attempt: u32 = 0;
        let mut resync_without_ack = 0u32;
        let mut logged: Option<&'static str> = None;
        loop {
            // Nothing to send before the first sample.
            if self.latest.borrow().is_none() {
                tokio::select! {
                    _ = self.shutdown.wait_for(|s| *s) => return,
                    changed = self.latest.changed() => if changed.is_err() { return },
                }
                continue;
            }
            let end = self.session(&mut progress, &mut logged, &mut attempt).await;
            let (failure, acked) = match end {
                SessionEnd::Shutdown => return,
                SessionEnd::Failed { failure, acked } => (failure, acked),
            };
            if acked {
                resync_without_ack = 0;
            }
            self.metrics.uplink_failed(failure.reason);
            self.metrics.set_connected(false);
            self.link.send_replace(LinkStatus::Disconnected {
                reason: format!("{}: {}", failure.reason, failure.detail),
            });
            if logged != Some(failure.reason) {
                match failure.level {
                    FailureLevel::Rejected => tracing::error!(
                        scaler = %self.config.scaler_url,
                        reason = failure.reason,
                        detail = %failure.detail,
                        "the scaler rejected a report; starting over with a snapshot after backoff"
                    ),
                    _ => tracing::warn!(
                        scaler = %self.config.scaler_url,
                        reason = failure.reason,
                        detail = %failure.detail,
                        "scaler link down; sampling continues, retrying with backoff"
                    ),
                }
                logged = Some(failure.reason);
            } else {
                tracing::debug!(reason = failure.reason, detail = %failure.detail, attempt, "scaler link still down");
            }
            if failure.level == FailureLevel::Resync && resync_without_ack == 0 {
                resync_without_ack += 1;
                continue;
            }
            if failure.level == FailureLevel::Resync {
                resync_without_ack += 1;
            }
            let delay = self.config.backoff.delay(attempt, jitter.draw());
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = self.shutdown.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    fn report(&self, progress: &mut Progress, body: ReportBody) -> v1::NodeReport {
        progress.seq += 1;
        v1::NodeReport::from(&AgentReport {
            boot_epoch: self.epoch,
            seq: progress.seq,
            sent_at: self.now(),
            body,
        })
    }

    fn now(&self) -> Timestamp {
        self.clock.now()
    }

    fn take_latest(&mut self) -> Arc<Sampled> {
        let newest = self
            .latest
            .borrow_and_update()
            .clone()
            .expect("invariant: the uplink runs sessions only after the first sample");
        newest.claim();
        newest
    }

    async fn session(
        &mut self,
        progress: &mut Progress,
        logged: &mut Option<&'static str>,
        attempt: &mut u32,
    ) -> SessionEnd {
        let failed = |reason, detail: String, level| SessionEnd::Failed {
            failure: Failure {
                reason,
                detail,
                level,
            },
            acked: false,
        };
        let endpoint = match endpoint(&self.config) {
            Ok(e) => e,
            Err(detail) => return failed("tls_config", detail, FailureLevel::Rejected),
        };
        let token = match bearer(&self.config) {
            Ok(t) => t,
            Err(detail) => return failed("token_file", detail, FailureLevel::Rejected),
        };
        let channel = tokio::select! {
            _ = self.shutdown.wait_for(|s| *s) => return SessionEnd::Shutdown,
            c = endpoint.connect() => match c {
                Ok(c) => c,
                Err(e) => {
                    let detail = std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string());
                    return failed("unreachable", detail, FailureLevel::Transient);
                }
            },
        };
        let mut client = AgentServiceClient::new(channel);
        let (tx, rx) = mpsc::channel::<v1::NodeReport>(OUTBOUND_QUEUE);
        let mut last_sent = self.take_latest();
        let first = self.report(progress, ReportBody::Snapshot(last_sent.snapshot.clone()));
        if tx.try_send(first).is_err() {
            return failed(
                "closed",
                "the outbound queue closed before the first report".into(),
                FailureLevel::Transient,
            );
        }
        self.metrics.report_sent(true);
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(token) = token {
            request.metadata_mut().insert("authorization", token);
        }
        let response = tokio::select! {
            _ = self.shutdown.wait_for(|s| *s) => return SessionEnd::Shutdown,
            r = client.report(request) => r,
        };
        let mut inbound = match response {
            Ok(r) => r.into_inner(),
            Err(status) => {
                return SessionEnd::Failed {
                    failure: failure_from_status(&status),
                    acked: false,
                };
            }
        };
        if progress.ever_connected {
            self.metrics.reconnected();
        }
        progress.ever_connected = true;
        self.metrics.set_connected(true);
        self.link.send_replace(LinkStatus::Connected);
        if *logged != Some("connected") {
            tracing::info!(scaler = %self.config.scaler_url, epoch = self.epoch, seq = progress.seq, "connected to the scaler; sent a snapshot");
            *logged = Some("connected");
        }

        let mut pending = false;
        let mut acked = false;
        loop {
            let event = tokio::select! {
                biased;
                _ = self.shutdown.wait_for(|s| *s) => Event::Shutdown,
                msg = inbound.message() => Event::Inbound(msg),
                changed = self.latest.changed(), if !pending => Event::Changed(changed.is_ok()),
                permit = tx.reserve(), if pending => Event::Writable(permit.ok()),
            };
            match event {
                Event::Shutdown | Event::Changed(false) => return SessionEnd::Shutdown,
                Event::Changed(true) => pending = true,
                Event::Inbound(Ok(Some(d))) => {
                    if self.directive(d) && !acked {
                        acked = true;
                        *attempt = 0;
                    }
                }
                Event::Inbound(Ok(None)) => {
                    return SessionEnd::Failed {
                        failure: Failure {
                            reason: "closed",
                            detail: "the scaler ended the stream".into(),
                            level: FailureLevel::Transient,
                        },
                        acked,
                    };
                }
                Event::Inbound(Err(status)) => {
                    return SessionEnd::Failed {
                        failure: failure_from_status(&status),
                        acked,
                    };
                }
                Event::Writable(None) => {
                    return SessionEnd::Failed {
                        failure: Failure {
                            reason: "closed",
                            detail: "the transport dropped the request stream".into(),
                            level: FailureLevel::Transient,
                        },
                        acked,
                    };
                }
                Event::Writable(Some(permit)) => {
                    let newest = self.take_latest();
                    let delta = diff::diff(&last_sent.snapshot, &newest.snapshot);
                    permit.send(self.report(progress, ReportBody::Delta(delta)));
                    self.metrics.report_sent(false);
                    last_sent = newest;
                    pending = false;
                }
            }
        }
    }

    /// Applies one directive; returns true for an acknowledgement.
    fn directive(&self, d: v1::ScalerDirective) -> bool {
        match Directive::try_from(d) {
            Ok(Directive::Ack { seq }) => {
                tracing::trace!(seq, "acknowledged");
                true
            }
            Ok(directive) => {
                if let Directive::SetSampleInterval { interval } = &directive {
                    self.interval.send_if_modified(|i| {
                        let changed = *i != *interval;
                        *i = *interval;
                        changed
                    });
                }
                let changed = self.directives.send_if_modified(|s| s.apply(&directive));
                if changed {
                    tracing::info!(?directive, "directive from the scaler");
                }
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "ignoring an invalid directive from the scaler");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_files_are_read_up_to_a_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        let mut config = AgentConfig::new("http://scaler:7070", "node-a");
        config.uplink_security.token_file = Some(path.clone());
        std::fs::write(&path, "abc\n").expect("write");
        assert!(bearer(&config).expect("a token").is_some());
        std::fs::write(&path, vec![b'a'; 2 * 1024 * 1024]).expect("write");
        let e = bearer(&config).expect_err("too large");
        assert!(
            e.contains("--token-file") && e.contains("larger than 1048576 bytes"),
            "{e}"
        );
    }
}
