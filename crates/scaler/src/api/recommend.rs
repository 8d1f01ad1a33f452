//! `gpuscale.v1.ScalerService`: recommendations for routers, gateways,
//! serving frameworks and dashboards.
//!
//! * `WatchRecommendations(selector, namespace)`: first the current
//!   recommendation of every matching workload, then each change (any field
//!   but `decided_at_unix_ms`: a decision made again with the same outcome
//!   and reason is not sent again). A workload that stops matching or is
//!   unregistered is sent once more with `removed: true`. The selector is
//!   Kubernetes label-selector syntax over workload labels ([`super::selector`]);
//!   a malformed one is `INVALID_ARGUMENT` naming the problem.
//! * `Explain(workload)`: the last decision in full; `NOT_FOUND` naming an
//!   unknown workload, `UNAVAILABLE` before its first decision.
//! * `ListWorkloads(namespace, selector)`: every matching workload with its
//!   labels and recommendation.
//!
//! The watch runs in a task per subscriber that follows the published view
//! (a `watch` channel: it only ever sees the newest view, so a burst of
//! publications costs one comparison) and `try_send`s into the
//! subscriber's bounded buffer. The buffer holds the initial state plus
//! [`super::ApiConfig::watch_buffer`] changes; a subscriber that lets it
//! fill up is dropped (`RESOURCE_EXHAUSTED`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use gpuscale_core::WorkloadRef;
use gpuscale_core::selector::LabelSelector;
use gpuscale_policy::Action;
use gpuscale_proto::v1;
use gpuscale_proto::v1::scaler_service_server::{ScalerService, ScalerServiceServer};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::{ApiContext, ApiStream, StreamEnd, bounded_stream, next_view, unknown_workload};
use crate::edge::{Authenticator, Caller};
use crate::view::{StateView, WorkloadView};
use gpuscale_core::SloStatus;

/// The `ScalerService` implementation.
#[derive(Debug, Clone)]
pub struct RecommendationService {
    context: ApiContext,
}

impl RecommendationService {
    pub fn new(context: ApiContext) -> Self {
        Self { context }
    }

    pub fn into_server(self) -> ScalerServiceServer<Self> {
        ScalerServiceServer::new(self)
    }
}

/// Which workloads a request selects: a namespace (empty: all) and a label selector.
#[derive(Debug, Clone)]
struct Filter {
    namespace: String,
    selector: LabelSelector,
}

impl Filter {
    fn parse(namespace: &str, selector: &str) -> Result<Self, Status> {
        let selector = super::parse_selector(selector)?;
        Ok(Self {
            namespace: namespace.to_string(),
            selector,
        })
    }

    fn matches(&self, w: &WorkloadView) -> bool {
        (self.namespace.is_empty() || w.workload.namespace == self.namespace)
            && self.selector.matches(&w.labels)
    }
}

fn wire_ref(w: &WorkloadRef) -> v1::WorkloadRef {
    v1::WorkloadRef {
        namespace: w.namespace.clone(),
        name: w.name.clone(),
    }
}

pub(crate) fn action_str(a: Action) -> &'static str {
    match a {
        Action::Hold => "hold",
        Action::ScaleUp => "scale_up",
        Action::ScaleDown => "scale_down",
    }
}

pub(crate) fn wire_slo(s: SloStatus) -> v1::SloStatus {
    match s {
        SloStatus::Met => v1::SloStatus::Met,
        SloStatus::AtRisk => v1::SloStatus::AtRisk,
        SloStatus::Breached => v1::SloStatus::Breached,
        SloStatus::Unknown => v1::SloStatus::NoData,
    }
}

/// The SLO status of a workload as its latest decision judged it.
pub(crate) fn workload_slo(w: &WorkloadView) -> SloStatus {
    w.decision
        .as_ref()
        .map_or(SloStatus::Unknown, |d| d.slo.status)
}

/// A workload's recommendation as the API streams it.
pub fn recommendation(w: &WorkloadView) -> v1::Recommendation {
    let mut r = v1::Recommendation {
        workload: Some(wire_ref(&w.workload)),
        slo_status: wire_slo(workload_slo(w)) as i32,
        ..v1::Recommendation::default()
    };
    if let Some(o) = &w.observation {
        r.ready_replicas = o.replicas.ready;
        r.in_flight_replicas = o.replicas.in_flight();
    }
    match &w.decision {
        Some(d) => {
            r.desired_replicas = d.desired_replicas;
            r.current_replicas = d.current_replicas;
            r.batch_limit = d.batch_limit;
            r.reason = d.summary();
            r.decided_at_unix_ms = d.at.as_millis();
            r.advisory = d.advisory;
            r.action = action_str(d.action).to_string();
            r.winner = d.winner.as_str().to_string();
        }
        None => {
            r.reason = w
                .warming_up
                .clone()
                .unwrap_or_else(|| "no decision yet".to_string())
        }
    }
    r
}

/// The last decision of a workload in full.
pub(crate) fn decision_record(w: &WorkloadView) -> Option<v1::DecisionRecord> {
    let d = w.decision.as_ref()?;
    Some(v1::DecisionRecord {
        workload: Some(wire_ref(&w.workload)),
        decided_at_unix_ms: d.at.as_millis(),
        current_replicas: d.current_replicas,
        desired_replicas: d.desired_replicas,
        batch_limit: d.batch_limit,
        winner: d.winner.as_str().to_string(),
        recommendations: d
            .recommendations
            .iter()
            .map(|r| v1::RecommendationDetail {
                source: r.source.as_str().to_string(),
                replicas: r.replicas,
                reason: r.reason.clone(),
            })
            .collect(),
        limits_applied: d.limits_applied(),
        model_confidence: d.model_confidence,
        summary: d.summary(),
        detail_json: serde_json::to_string(d).unwrap_or_default(),
        advisory: d.advisory,
        action: action_str(d.action).to_string(),
        victims: d.victims.clone(),
        observation_json: w
            .observation
            .as_ref()
            .and_then(|o| serde_json::to_string(o).ok())
            .unwrap_or_default(),
        slo_status: wire_slo(workload_slo(w)) as i32,
        last_actuation: w.last_actuation.as_ref().map(|a| v1::Actuation {
            at_unix_ms: a.at.as_millis(),
            replicas: a.replicas,
            error: a.result.clone().err().unwrap_or_default(),
        }),
    })
}

/// The recommendation without its decision time: what counts as a change.
fn comparable(r: &v1::Recommendation) -> v1::Recommendation {
    v1::Recommendation {
        decided_at_unix_ms: 0,
        ..r.clone()
    }
}

/// Which workloads one caller may read: decided once per workload, again
/// after the authorisation cache's lifetime (so a revoked grant takes
/// effect within it).
struct Readable {
    auth: Arc<Authenticator>,
    caller: Caller,
    decided: std::collections::HashMap<WorkloadRef, bool>,
    since: Instant,
}

impl Readable {
    fn new(auth: Arc<Authenticator>, caller: Caller) -> Self {
        Self {
            auth,
            caller,
            decided: std::collections::HashMap::new(),
            since: Instant::now(),
        }
    }

    /// Decides the workloads of `view` that `filter` selects and that are
    /// not decided yet. A check that cannot be made now is left undecided
    /// (the workload is not shown) and tried again at the next view.
    async fn update(&mut self, view: &StateView, filter: &Filter) {
        if !self.auth.enabled() {
            return;
        }
        if self.since.elapsed() > self.auth.config().authz_cache_ttl {
            self.decided.clear();
            self.since = Instant::now();
        }
        for w in view.workloads.values().filter(|w| filter.matches(w)) {
            if self.decided.contains_key(&w.workload) {
                continue;
            }
            if let Ok(allowed) = self.auth.may_read(&self.caller, &w.workload).await {
                self.decided.insert(w.workload.clone(), allowed);
            }
        }
    }

    fn allows(&self, w: &WorkloadRef) -> bool {
        !self.auth.enabled() || self.decided.get(w) == Some(&true)
    }
}

/// What one subscriber was last sent, per workload, and the workload view
/// it came from (views of unchanged workloads are shared between
/// publications, so an unchanged workload costs a pointer comparison).
#[derive(Debug, Default)]
struct Sent {
    by_workload: BTreeMap<WorkloadRef, (Arc<WorkloadView>, v1::Recommendation)>,
}

impl Sent {
    /// The messages that bring the subscriber from what it was sent to `view`.
    fn changes(
        &mut self,
        view: &StateView,
        filter: &Filter,
        readable: &Readable,
    ) -> Vec<v1::Recommendation> {
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        for w in view
            .workloads
            .values()
            .filter(|w| filter.matches(w) && readable.allows(&w.workload))
        {
            seen.insert(&w.workload);
            if let Some((last, _)) = self.by_workload.get(&w.workload)
                && Arc::ptr_eq(last, w)
            {
                continue;
            }
            let rec = recommendation(w);
            let cmp = comparable(&rec);
            let changed = self
                .by_workload
                .get(&w.workload)
                .is_none_or(|(_, sent)| *sent != cmp);
            self.by_workload
                .insert(w.workload.clone(), (w.clone(), cmp));
            if changed {
                out.push(rec);
            }
        }
        let gone: Vec<WorkloadRef> = self
            .by_workload
            .keys()
            .filter(|w| !seen.contains(w))
            .cloned()
            .collect();
        for w in gone {
            self.by_workload.remove(&w);
            out.push(v1::Recommendation {
                workload: Some(wire_ref(&w)),
                removed: true,
                reason:
                    "no longer selected: unregistered, its labels changed, or no longer readable"
                        .into(),
                ..v1::Recommendation::default()
            });
        }
        out
    }
}

/// The API name in metrics.
const API: &str = "watch_recommendations";

#[tonic::async_trait]
impl ScalerService for RecommendationService {
    type WatchRecommendationsStream = ApiStream<v1::Recommendation>;

    async fn watch_recommendations(
        &self,
        request: Request<v1::WatchRecommendationsRequest>,
    ) -> Result<Response<Self::WatchRecommendationsStream>, Status> {
        let caller = self.context.caller(request.extensions());
        let r = request.into_inner();
        let filter = Filter::parse(&r.namespace, &r.selector)?;
        let slot = self.context.watcher_slot(API)?;
        let mut view = self.context.view.clone();
        let first = view.borrow_and_update().clone();
        let mut readable = Readable::new(self.context.auth.clone(), caller);
        readable.update(&first, &filter).await;
        let mut sent = Sent::default();
        let initial = sent.changes(&first, &filter, &readable);
        let capacity = initial.len() + self.context.config.watch_buffer;
        let (tx, stream) = bounded_stream(capacity, slot, API, self.context.metrics.clone());
        for rec in initial {
            // Room for the whole initial state was made above.
            if tx.send(rec).is_err() {
                return Ok(Response::new(stream));
            }
        }
        let mut shutdown = self.context.shutdown.clone();
        tokio::spawn(async move {
            loop {
                if let Some(end) = next_view(&mut view, &mut shutdown, &tx).await {
                    tx.finish(end);
                    return;
                }
                let current = view.borrow_and_update().clone();
                readable.update(&current, &filter).await;
                for rec in sent.changes(&current, &filter, &readable) {
                    if let Err(end) = tx.send(rec) {
                        debug_assert!(matches!(end, StreamEnd::Slow | StreamEnd::Closed));
                        return;
                    }
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn explain(
        &self,
        request: Request<v1::ExplainRequest>,
    ) -> Result<Response<v1::DecisionRecord>, Status> {
        let (_, extensions, r) = request.into_parts();
        let w = r
            .workload
            .ok_or_else(|| Status::invalid_argument("workload is missing: name the workload"))?;
        let workload = super::workload_ref("workload", &w.namespace, &w.name)?;
        self.context.authorize(&extensions, &workload).await?;
        let view = self.context.current();
        let Some(wv) = view.workloads.get(&workload) else {
            return Err(unknown_workload(&view, &workload));
        };
        decision_record(wv)
            .map(Response::new)
            .ok_or_else(|| {
                Status::unavailable(match &wv.warming_up {
                    Some(warming) => format!("workload {workload}: {warming}; retry shortly"),
                    None => format!(
                        "workload {workload} has no decision yet (every workload is decided each tick); retry shortly"
                    ),
                })
            })
    }

    async fn list_workloads(
        &self,
        request: Request<v1::ListWorkloadsRequest>,
    ) -> Result<Response<v1::ListWorkloadsResponse>, Status> {
        let caller = self.context.caller(request.extensions());
        let r = request.into_inner();
        let filter = Filter::parse(&r.namespace, &r.selector)?;
        let view: Arc<StateView> = self.context.current();
        let mut readable = Vec::new();
        for w in view.workloads.values().filter(|w| filter.matches(w)) {
            if self.context.auth.may_read(&caller, &w.workload).await? {
                readable.push(w);
            }
        }
        let workloads = readable
            .into_iter()
            .map(|w| v1::WorkloadSummary {
                workload: Some(wire_ref(&w.workload)),
                labels: w.labels.clone().into_iter().collect(),
                recommendation: Some(recommendation(w)),
            })
            .collect();
        Ok(Response::new(v1::ListWorkloadsResponse { workloads }))
    }
}
