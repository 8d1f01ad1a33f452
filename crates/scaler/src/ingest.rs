//! The gRPC edge of the agents' streams: validate, convert, hand over.
//!
//! Each `AgentService.Report` stream gets its own task. It reads the
//! stream, converts every report ([`AgentReport::from_wire`], which rejects
//! NaN, negative and absurd values by field; a bad engine entry is left out
//! and counted, `gpuscale_scaler_engine_entries_rejected_total`, never the
//! whole node), checks the stream's sequence
//! ([`StreamValidator`]), and hands the report to the state task through the
//! one bounded ingest queue. It owns nothing else; the state task owns all
//! state.
//!
//! **When the ingest queue is full** (the state task is behind), the stream
//! task waits for room, up to `ingest_wait`; waiting stops reading this one
//! stream, and HTTP/2 flow control then slows that agent down. Every stream
//! task waits in the same FIFO queue of senders, so no agent can starve the
//! others, and the state task never waits for any agent. If the queue stays
//! full for `ingest_wait`, the stream is ended with `UNAVAILABLE`: the agent
//! backs off, coalesces, and comes back with a snapshot — load is shed
//! instead of memory growing.
//!
//! **Who may stream**: the edge ([`crate::edge`]) authenticated the agent
//! before the stream started; an agent credential bound to a node (the
//! token's pod's node, a certificate's DNS name) may report that node only:
//! a snapshot of another node ends the stream with `PERMISSION_DENIED`
//! (counted in `gpuscale_scaler_auth_refused_total{reason="node_mismatch"}`).
//! A stream ends with `UNAUTHENTICATED` when its token expires (the agent
//! reconnects with the rotated token). A stream may send at most
//! `agent_reports_per_second` reports (bursts of twice as many); beyond,
//! the stream task stops reading for a while and HTTP/2 flow control slows
//! the agent down.
//!
//! **Bad input** ends only the offending stream, with a status naming the
//! problem, logged once for that stream:
//! * a message over the size limit: `RESOURCE_EXHAUSTED`;
//! * undecodable bytes, a value out of range, a sequence
//!   number that goes backwards, a node name that changes: `INVALID_ARGUMENT`;
//! * a delta without a snapshot first, a delta of another boot epoch, a gap
//!   in the sequence: `FAILED_PRECONDITION` (the agent reconnects and resends
//!   a snapshot);
//! * a stream whose node sent nothing for the node TTL (a partition, a hung
//!   agent: silent, not closed) is ended with `FAILED_PRECONDITION` when the
//!   node is forgotten, so that what it sends after the silence starts with
//!   a snapshot instead of deltas of a node the scaler no longer has.
//!
//! **Directives** flow back through a bounded per-stream queue; the state
//! task only ever `try_send`s into it (see `state`), so an agent that does
//! not read its directives cannot block anything.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use gpuscale_core::sample::NodeDelta;
use gpuscale_core::{GpuUuid, NodeName};
use gpuscale_proto::v1;
use gpuscale_proto::v1::agent_service_server::AgentService;
use gpuscale_proto::{AgentReport, ReportBody};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::edge::auth::{CallKind, Refusal, quote};
use crate::edge::{Authenticator, Caller, caller_of};
use crate::metrics::ScalerMetrics;
use crate::state::Command;
use crate::stopped;
use gpuscale_rt::Clock;

/// Identifies one agent stream for the life of the scaler process.
pub(crate) type StreamId = u64;

/// Why a stream was ended: the gRPC code, a bounded reason for metrics and
/// the message for the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: Code,
    pub reason: &'static str,
    pub message: String,
}

impl Rejection {
    fn invalid(reason: &'static str, message: String) -> Self {
        Self {
            code: Code::InvalidArgument,
            reason,
            message,
        }
    }
    fn precondition(reason: &'static str, message: String) -> Self {
        Self {
            code: Code::FailedPrecondition,
            reason,
            message,
        }
    }
}

/// The checks that need the stream's history: sequence, epoch, node name,
/// and which GPUs exist (with their memory, for `memory_used_bytes`).
#[derive(Debug, Default)]
pub struct StreamValidator {
    epoch: Option<u64>,
    last_seq: u64,
    node: Option<NodeName>,
    gpus: HashMap<GpuUuid, u64>,
}

impl StreamValidator {
    pub fn new() -> Self {
        Self::default()
    }

    /// The node this stream reports for, once it sent a snapshot.
    pub fn node(&self) -> Option<&NodeName> {
        self.node.as_ref()
    }

    /// Accepts `report` as the next message of the stream, or says why not.
    pub fn check(&mut self, report: &AgentReport) -> Result<(), Rejection> {
        match &report.body {
            ReportBody::Snapshot(s) => {
                if let Some(node) = &self.node
                    && *node != s.node
                {
                    return Err(Rejection::invalid(
                        "node_changed",
                        format!(
                            "snapshot.node_name: {:?} differs from {:?}, the node this stream reports for",
                            quote(s.node.as_str()),
                            quote(node.as_str())
                        ),
                    ));
                }
                if self.epoch == Some(report.boot_epoch) && report.seq <= self.last_seq {
                    return Err(self.out_of_order(report.seq));
                }
                self.epoch = Some(report.boot_epoch);
                self.last_seq = report.seq;
                self.node = Some(s.node.clone());
                self.gpus = s
                    .gpus
                    .iter()
                    .map(|g| (g.info.uuid.clone(), g.info.memory_total_bytes))
                    .collect();
                Ok(())
            }
            ReportBody::Delta(d) => {
                let Some(epoch) = self.epoch else {
                    return Err(Rejection::precondition(
                        "not_snapshot_first",
                        format!(
                            "unknown epoch {}: a stream must start with a snapshot, got a delta (seq {})",
                            report.boot_epoch, report.seq
                        ),
                    ));
                };
                if report.boot_epoch != epoch {
                    return Err(Rejection::precondition(
                        "unknown_epoch",
                        format!(
                            "unknown epoch {}: this stream's snapshot was of epoch {epoch}; send a snapshot",
                            report.boot_epoch
                        ),
                    ));
                }
                if report.seq <= self.last_seq {
                    return Err(self.out_of_order(report.seq));
                }
                if report.seq != self.last_seq + 1 {
                    return Err(Rejection::precondition(
                        "sequence_gap",
                        format!(
                            "sequence gap in epoch {epoch}: expected seq {}, got {}; send a snapshot",
                            self.last_seq + 1,
                            report.seq
                        ),
                    ));
                }
                self.check_delta_gpus(d)?;
                self.last_seq = report.seq;
                Ok(())
            }
        }
    }

    fn out_of_order(&self, seq: u64) -> Rejection {
        Rejection::invalid(
            "out_of_order",
            format!(
                "report.seq: {seq} is out of order; the last applied was {}",
                self.last_seq
            ),
        )
    }

    fn check_delta_gpus(&mut self, d: &NodeDelta) -> Result<(), Rejection> {
        // Most deltas change no inventory: check against the known GPUs
        // without copying them.
        let changed;
        let gpus = if d.gpus_upserted.is_empty() && d.gpus_removed.is_empty() {
            changed = None;
            &self.gpus
        } else {
            let mut gpus = self.gpus.clone();
            for u in &d.gpus_removed {
                gpus.remove(u);
            }
            for g in &d.gpus_upserted {
                gpus.insert(g.uuid.clone(), g.memory_total_bytes);
            }
            changed = Some(gpus);
            changed.as_ref().unwrap_or(&self.gpus)
        };
        for (i, m) in d.gpu_metrics.iter().enumerate() {
            let Some(total) = gpus.get(&m.uuid) else {
                return Err(Rejection::invalid(
                    "unknown_gpu",
                    format!(
                        "delta.gpu_metrics[{i}].uuid: {:?} is not a GPU of this node; send it in gpus_upserted first",
                        m.uuid.as_str()
                    ),
                ));
            };
            for (field, value) in [
                ("memory_used_bytes", m.memory_used_bytes),
                ("memory_free_bytes", m.memory_free_bytes),
            ] {
                if let Some(v) = value
                    && v > *total
                {
                    return Err(Rejection::invalid(
                        "invalid_value",
                        format!(
                            "delta.gpu_metrics[{i}].{field}: {v} is more than the GPU's memory_total_bytes {total}"
                        ),
                    ));
                }
            }
        }
        if let Some(gpus) = changed {
            self.gpus = gpus;
        }
        Ok(())
    }
}

/// Classifies an error `Streaming::message` returned: a bad message (which
/// the agent should hear about) or a transport failure (nobody to tell).
fn inbound_error(status: &Status, limit: usize) -> Option<Rejection> {
    let oversized = || Rejection {
        code: Code::ResourceExhausted,
        reason: "oversized",
        message: format!(
            "report larger than the scaler's limit of {limit} bytes ({})",
            quote(status.message())
        ),
    };
    match status.code() {
        Code::OutOfRange if status.message().contains("too large") => Some(oversized()),
        Code::ResourceExhausted => Some(oversized()),
        Code::Internal if status.message().contains("decode") => Some(Rejection::invalid(
            "malformed",
            format!("malformed report: {}", quote(status.message())),
        )),
        _ => None,
    }
}

/// The response stream of one agent: directives from the state task, ended
/// early by a terminal status from the stream task.
pub struct DirectiveStream {
    terminal: Option<oneshot::Receiver<Status>>,
    directives: mpsc::Receiver<v1::ScalerDirective>,
    done: bool,
}

impl std::fmt::Debug for DirectiveStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectiveStream")
            .field("done", &self.done)
            .finish()
    }
}

impl Stream for DirectiveStream {
    type Item = Result<v1::ScalerDirective, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(t) = self.terminal.as_mut() {
            match Pin::new(t).poll(cx) {
                Poll::Ready(Ok(status)) => {
                    self.done = true;
                    self.terminal = None;
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(Err(_)) => self.terminal = None,
                Poll::Pending => {}
            }
        }
        self.directives.poll_recv(cx).map(|d| d.map(Ok))
    }
}

/// What every stream task shares.
#[derive(Clone)]
pub(crate) struct Ingest {
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) metrics: Arc<ScalerMetrics>,
    pub(crate) ingest_wait: Duration,
    pub(crate) stream_outbound: usize,
    pub(crate) max_message_bytes: usize,
    pub(crate) next_stream: Arc<AtomicU64>,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// `None`: always active; else streams are served only while true.
    pub(crate) active: Option<watch::Receiver<bool>>,
    /// Counts and tracks refusals (a node mismatch is one).
    pub(crate) auth: Arc<Authenticator>,
    pub(crate) clock: Clock,
    /// Reports per second one stream may send; `None`: no limit.
    pub(crate) report_rate: Option<f64>,
}

/// Resolves once `active` turns false; never when there is no gate.
async fn standby(active: &mut Option<watch::Receiver<bool>>) {
    match active {
        Some(rx) => {
            let _ = rx.wait_for(|a| !*a).await;
        }
        None => std::future::pending::<()>().await,
    }
}

fn standby_status() -> Rejection {
    Rejection {
        code: Code::Unavailable,
        reason: "standby",
        message: "this scaler is a standby (not the leader); reconnect through the Service".into(),
    }
}

#[tonic::async_trait]
impl AgentService for Ingest {
    type ReportStream = DirectiveStream;

    async fn report(
        &self,
        request: Request<Streaming<v1::NodeReport>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        if let Some(active) = &self.active
            && !*active.borrow()
        {
            return Err(Status::new(Code::Unavailable, standby_status().message));
        }
        let caller = caller_of(request.extensions());
        let peer = caller.peer;
        let inbound = request.into_inner();
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let (out_tx, out_rx) = mpsc::channel(self.stream_outbound);
        let (terminal_tx, terminal_rx) = oneshot::channel();
        let task = StreamTask {
            id,
            peer,
            caller,
            ingest: self.clone(),
            out: out_tx,
            terminal: terminal_tx,
            validator: StreamValidator::new(),
            last_engine_rejections: Vec::new(),
        };
        tokio::spawn(task.run(inbound));
        Ok(Response::new(DirectiveStream {
            terminal: Some(terminal_rx),
            directives: out_rx,
            done: false,
        }))
    }
}

struct StreamTask {
    id: StreamId,
    peer: Option<std::net::SocketAddr>,
    caller: Caller,
    ingest: Ingest,
    out: mpsc::Sender<v1::ScalerDirective>,
    terminal: oneshot::Sender<Status>,
    validator: StreamValidator,
    /// What was wrong with the engine entries last left out (logged on change).
    last_engine_rejections: Vec<String>,
}

enum Next {
    Report(Box<AgentReport>),
    End,
    Reject(Rejection),
}

impl StreamTask {
    async fn run(mut self, mut inbound: Streaming<v1::NodeReport>) {
        self.ingest.metrics.stream_opened();
        tracing::debug!(stream = self.id, peer = ?self.peer, "agent stream opened");
        let mut shutdown = self.ingest.shutdown.clone();
        let mut active = self.ingest.active.clone();
        // The stream lives no longer than its credential.
        let expiry = self.caller.expires_at.map(|at| {
            let left = at
                .as_millis()
                .saturating_sub(self.ingest.clock.now().as_millis());
            tokio::time::Instant::now() + Duration::from_millis(u64::try_from(left).unwrap_or(0))
        });
        let rate = self.ingest.report_rate;
        let mut bucket = rate.map(|r| crate::edge::Bucket::full(2.0 * r));
        // The state ends the stream when its node expires.
        let (end_tx, end_rx) = oneshot::channel::<Rejection>();
        let mut end_rx = Some(end_rx);
        let opened = tokio::time::timeout(
            self.ingest.ingest_wait,
            self.ingest.commands.send(Command::StreamOpened {
                stream: self.id,
                end: end_tx,
            }),
        )
        .await;
        if !matches!(opened, Ok(Ok(()))) {
            self.reject(match opened {
                Err(_) => Rejection {
                    code: Code::Unavailable,
                    reason: "ingest_queue_full",
                    message: "the scaler's ingest queue is full; reconnect with backoff".into(),
                },
                Ok(_) => shutting_down(),
            });
            self.ingest.metrics.stream_closed();
            return;
        }
        loop {
            if let (Some(rate), Some(b)) = (rate, bucket.as_mut())
                && let Err(wait) = b.take(rate, 2.0 * rate)
            {
                // Too fast: stop reading for a while; flow control slows the agent.
                tokio::select! {
                    _ = stopped(&mut shutdown) => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            let next = tokio::select! {
                biased;
                _ = stopped(&mut shutdown) => Next::Reject(Rejection {
                    code: Code::Unavailable,
                    reason: "shutdown",
                    message: "the scaler is shutting down; reconnect with backoff".into(),
                }),
                _ = standby(&mut active) => Next::Reject(standby_status()),
                _ = self.terminal.closed() => Next::End,
                r = ended_by_state(&mut end_rx) => Next::Reject(r),
                _ = until(expiry) => Next::Reject(Rejection {
                    code: Code::Unauthenticated,
                    reason: "token_expired",
                    message: "the stream's token expired; reconnect with the rotated token".into(),
                }),
                msg = inbound.message() => match msg {
                    Ok(Some(wire)) => match AgentReport::from_wire(wire) {
                        Ok((report, rejected)) => match self.bound(&report).and_then(|()| self.validator.check(&report)) {
                            Ok(()) if !rejected.is_empty() => {
                                self.engines_rejected(&rejected);
                                Next::Report(Box::new(report))
                            }
                            Ok(()) => Next::Report(Box::new(report)),
                            Err(r) => Next::Reject(r),
                        },
                        Err(e) => Next::Reject(Rejection::invalid("invalid_value", quote_long(&e.to_string()))),
                    },
                    Ok(None) => Next::End,
                    Err(status) => match inbound_error(&status, self.ingest.max_message_bytes) {
                        Some(r) => Next::Reject(r),
                        None => {
                            tracing::debug!(stream = self.id, node = ?self.validator.node(), %status, "agent stream broke");
                            Next::End
                        }
                    },
                },
            };
            match next {
                Next::Report(report) => {
                    if let Err(r) = self.hand_over(report).await {
                        self.reject(r);
                        break;
                    }
                }
                Next::End => break,
                Next::Reject(r) => {
                    self.reject(r);
                    break;
                }
            }
        }
        // Tell the state task; it drops its directive sender, which ends the
        // response stream if it has not ended already.
        let _ = tokio::time::timeout(
            self.ingest.ingest_wait,
            self.ingest
                .commands
                .send(Command::StreamClosed { stream: self.id }),
        )
        .await;
        self.ingest.metrics.stream_closed();
        tracing::debug!(stream = self.id, node = ?self.validator.node(), "agent stream closed");
    }

    /// Counts the engine entries left out of a report (the rest of it is
    /// applied) and logs them, once per change of what was wrong.
    fn engines_rejected(&mut self, rejected: &[gpuscale_proto::RejectedEngine]) {
        self.ingest.metrics.engines_rejected(rejected.len());
        let errors: Vec<String> = rejected.iter().map(|r| r.error.to_string()).collect();
        if self.last_engine_rejections != errors {
            let pods: Vec<String> = rejected
                .iter()
                .map(|r| r.pod.as_ref().map_or_else(|| "?".into(), |p| p.to_string()))
                .collect();
            tracing::warn!(stream = self.id, node = ?self.validator.node(), pods = ?pods,
                errors = ?errors, "engine entries left out of an agent's report; the rest of the node is applied");
            self.last_engine_rejections = errors;
        }
    }

    /// A snapshot must be of the node the caller's credential is bound to.
    fn bound(&self, report: &AgentReport) -> Result<(), Rejection> {
        let (ReportBody::Snapshot(s), Some(node)) = (&report.body, &self.caller.node) else {
            return Ok(());
        };
        if s.node == *node {
            return Ok(());
        }
        let refusal = Refusal {
            code: Code::PermissionDenied,
            reason: "node_mismatch",
            message: format!(
                "snapshot.node_name: {:?} is not {:?}, the node this agent's credential is bound to",
                quote(s.node.as_str()),
                quote(node.as_str())
            ),
        };
        self.ingest
            .auth
            .refused(CallKind::Agent, &refusal, self.peer, Some(&self.caller));
        Err(Rejection {
            code: refusal.code,
            reason: refusal.reason,
            message: refusal.message,
        })
    }

    async fn hand_over(&mut self, report: Box<AgentReport>) -> Result<(), Rejection> {
        let out = matches!(report.body, ReportBody::Snapshot(_)).then(|| self.out.clone());
        let command = Command::Report {
            stream: self.id,
            report,
            out,
        };
        let command = match self.ingest.commands.try_send(command) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Closed(_)) => return Err(shutting_down()),
            Err(TrySendError::Full(c)) => c,
        };
        self.ingest.metrics.ingest_queue_full();
        match tokio::time::timeout(self.ingest.ingest_wait, self.ingest.commands.send(command))
            .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(shutting_down()),
            Err(_) => Err(Rejection {
                code: Code::Unavailable,
                reason: "ingest_queue_full",
                message: format!(
                    "the scaler's ingest queue stayed full for {:?}; reconnect with backoff",
                    self.ingest.ingest_wait
                ),
            }),
        }
    }

    /// Ends the stream with `r`, logged once for this stream.
    fn reject(&mut self, r: Rejection) {
        self.ingest.metrics.rejected(r.reason);
        let node = self.validator.node().map(|n| n.to_string());
        match r.code {
            Code::Unavailable => {
                tracing::info!(stream = self.id, peer = ?self.peer, node, reason = r.reason, message = %r.message, "ending agent stream")
            }
            _ => {
                tracing::warn!(stream = self.id, peer = ?self.peer, node, code = ?r.code, reason = r.reason, message = %r.message, "rejected agent report; ending its stream")
            }
        }
        let terminal = std::mem::replace(&mut self.terminal, oneshot::channel().0);
        let _ = terminal.send(Status::new(r.code, r.message));
    }
}

/// The rejection the state ends the stream with; never once the state
/// dropped its end without using it.
async fn ended_by_state(rx: &mut Option<oneshot::Receiver<Rejection>>) -> Rejection {
    if let Some(r) = rx.as_mut()
        && let Ok(rejection) = r.await
    {
        return rejection;
    }
    *rx = None;
    std::future::pending().await
}

/// Resolves at `at`; never without one.
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending::<()>().await,
    }
}

/// A message built from caller input, bounded (a conversion error quotes
/// the offending value).
fn quote_long(message: &str) -> String {
    const LIMIT: usize = 512;
    if message.len() <= LIMIT {
        return message.to_string();
    }
    let mut end = LIMIT;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &message[..end], message.len())
}

fn shutting_down() -> Rejection {
    Rejection {
        code: Code::Unavailable,
        reason: "shutdown",
        message: "the scaler is shutting down; reconnect with backoff".into(),
    }
}

#[cfg(test)]
mod tests {
    use gpuscale_core::Timestamp;
    use gpuscale_core::sample::{AgentHealth, GpuInfo, GpuMetrics, GpuSample, NodeSnapshot};

    use super::*;

    fn snapshot(node: &str) -> ReportBody {
        let uuid = GpuUuid::new("GPU-1");
        ReportBody::Snapshot(NodeSnapshot {
            node: NodeName::new(node),
            agent_version: String::new(),
            sampled_at: Timestamp(1),
            sample_interval_ms: 1000,
            gpus: vec![GpuSample {
                info: GpuInfo {
                    uuid: uuid.clone(),
                    index: 0,
                    model_name: String::new(),
                    memory_total_bytes: 100,
                    pci_bus_id: String::new(),
                    parent_uuid: None,
                    mig_gpu_instance_id: None,
                    gpm_supported: false,
                    driver_version: String::new(),
                },
                metrics: GpuMetrics {
                    uuid,
                    ..GpuMetrics::default()
                },
            }],
            pods: vec![],
            engines: vec![],
            agent: AgentHealth::default(),
        })
    }

    fn report(epoch: u64, seq: u64, body: ReportBody) -> AgentReport {
        AgentReport {
            boot_epoch: epoch,
            seq,
            sent_at: Timestamp(1),
            body,
        }
    }

    fn delta() -> ReportBody {
        ReportBody::Delta(NodeDelta::default())
    }

    #[test]
    fn stream_must_start_with_a_snapshot() {
        let mut v = StreamValidator::new();
        let r = v.check(&report(7, 1, delta())).expect_err("delta first");
        assert_eq!(r.code, Code::FailedPrecondition);
        assert!(r.message.contains("unknown epoch 7"), "{}", r.message);
    }

    #[test]
    fn deltas_continue_the_sequence_exactly() {
        let mut v = StreamValidator::new();
        v.check(&report(7, 10, snapshot("a"))).expect("snapshot");
        v.check(&report(7, 11, delta())).expect("next");
        let gap = v.check(&report(7, 13, delta())).expect_err("gap");
        assert_eq!(
            (gap.code, gap.reason),
            (Code::FailedPrecondition, "sequence_gap")
        );
        assert!(
            gap.message.contains("expected seq 12, got 13"),
            "{}",
            gap.message
        );
        let back = v.check(&report(7, 11, delta())).expect_err("repeat");
        assert_eq!(
            (back.code, back.reason),
            (Code::InvalidArgument, "out_of_order")
        );
        let epoch = v.check(&report(8, 12, delta())).expect_err("epoch");
        assert_eq!(
            (epoch.code, epoch.reason),
            (Code::FailedPrecondition, "unknown_epoch")
        );
        // A new snapshot of a new epoch (agent restarted) is accepted.
        v.check(&report(9, 1, snapshot("a"))).expect("restart");
        let other = v
            .check(&report(9, 2, snapshot("b")))
            .expect_err("other node");
        assert_eq!(other.reason, "node_changed");
    }

    #[test]
    fn metrics_of_an_unknown_gpu_or_too_much_memory_are_rejected() {
        let mut v = StreamValidator::new();
        v.check(&report(1, 1, snapshot("a"))).expect("snapshot");
        let mut d = NodeDelta::default();
        d.gpu_metrics.push(GpuMetrics {
            uuid: GpuUuid::new("GPU-9"),
            ..GpuMetrics::default()
        });
        let r = v
            .check(&report(1, 2, ReportBody::Delta(d)))
            .expect_err("unknown GPU");
        assert_eq!(r.reason, "unknown_gpu");
        let mut d = NodeDelta::default();
        d.gpu_metrics.push(GpuMetrics {
            uuid: GpuUuid::new("GPU-1"),
            memory_used_bytes: Some(101),
            ..GpuMetrics::default()
        });
        let r = v
            .check(&report(1, 2, ReportBody::Delta(d)))
            .expect_err("memory");
        assert!(
            r.message.contains("delta.gpu_metrics[0].memory_used_bytes"),
            "{}",
            r.message
        );
    }
}
