//! The scaler's [`AuthBackend`] on Kubernetes: TokenReview for agents'
//! and clients' tokens, SubjectAccessReview for reads of a workload
//! (`get` on its `InferenceAutoscaler`), the node of a token's pod when the
//! token carries no node claim (a `list` of that one pod by name, which the
//! scaler's `pods` `list` grant already covers), and an Event about a
//! repeat offender (on the offending pod when its token was valid, else on
//! this scaler's pod). RBAC grows by exactly `tokenreviews` and
//! `subjectaccessreviews` `create`.

use std::sync::Arc;

use gpuscale_core::WorkloadRef;
use gpuscale_scaler::edge::auth::{BackendError, BoxFuture};
use gpuscale_scaler::edge::{AuthBackend, Caller, Offender, TokenReview};
use k8s_openapi::api::authentication::v1 as authn;
use k8s_openapi::api::authorization::v1 as authz;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::Api;
use kube::api::{ListParams, PostParams};

use crate::context::Shared;
use crate::events::{EventSpec, EventType};

/// The API server as the source of identities and permissions.
pub(crate) struct KubeAuthBackend {
    shared: Arc<Shared>,
    /// The scaler's namespace (Events about unknown offenders go to its pod).
    namespace: String,
}

impl KubeAuthBackend {
    pub(crate) fn new(shared: Arc<Shared>, namespace: String) -> Self {
        Self { shared, namespace }
    }

    async fn timed<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, BackendError> {
        match tokio::time::timeout(self.shared.config.request_timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(BackendError(format!("{what}: {e}"))),
            Err(_) => Err(BackendError(format!(
                "{what}: no answer within {:?}",
                self.shared.config.request_timeout
            ))),
        }
    }
}

fn post() -> PostParams {
    PostParams::default()
}

impl AuthBackend for KubeAuthBackend {
    fn review<'a>(
        &'a self,
        token: &'a str,
        audience: &'a str,
    ) -> BoxFuture<'a, Result<TokenReview, BackendError>> {
        Box::pin(async move {
            let api: Api<authn::TokenReview> = Api::all(self.shared.client.clone());
            let request = authn::TokenReview {
                spec: authn::TokenReviewSpec {
                    token: Some(token.to_string()),
                    audiences: (!audience.is_empty()).then(|| vec![audience.to_string()]),
                },
                ..authn::TokenReview::default()
            };
            let answer = self
                .timed("TokenReview", api.create(&post(), &request))
                .await?;
            let status = answer.status.unwrap_or_default();
            let user = status.user.unwrap_or_default();
            Ok(TokenReview {
                authenticated: status.authenticated.unwrap_or(false),
                error: status.error.unwrap_or_default(),
                user: user.username.unwrap_or_default(),
                uid: user.uid.unwrap_or_default(),
                groups: user.groups.unwrap_or_default(),
                extra: user.extra.unwrap_or_default().into_iter().collect(),
                audiences: status.audiences.unwrap_or_default(),
            })
        })
    }

    fn pod_node<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, BackendError>> {
        Box::pin(async move {
            let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), namespace);
            let params = ListParams::default().fields(&format!("metadata.name={name}"));
            let pods = self
                .timed("listing the token's pod", api.list(&params))
                .await?;
            Ok(pods
                .items
                .into_iter()
                .next()
                .and_then(|p| p.spec)
                .and_then(|s| s.node_name)
                .filter(|n| !n.is_empty()))
        })
    }

    fn may_read<'a>(
        &'a self,
        caller: &'a Caller,
        workload: &'a WorkloadRef,
    ) -> BoxFuture<'a, Result<bool, BackendError>> {
        Box::pin(async move {
            let api: Api<authz::SubjectAccessReview> = Api::all(self.shared.client.clone());
            let request = authz::SubjectAccessReview {
                spec: authz::SubjectAccessReviewSpec {
                    user: Some(caller.user.clone()),
                    uid: (!caller.uid.is_empty()).then(|| caller.uid.clone()),
                    groups: (!caller.groups.is_empty()).then(|| caller.groups.clone()),
                    extra: (!caller.extra.is_empty())
                        .then(|| caller.extra.clone().into_iter().collect()),
                    resource_attributes: Some(authz::ResourceAttributes {
                        namespace: Some(workload.namespace.clone()),
                        verb: Some("get".into()),
                        group: Some(crate::crd::GROUP.into()),
                        resource: Some("inferenceautoscalers".into()),
                        name: Some(workload.name.clone()),
                        ..authz::ResourceAttributes::default()
                    }),
                    ..authz::SubjectAccessReviewSpec::default()
                },
                ..authz::SubjectAccessReview::default()
            };
            let answer = self
                .timed("SubjectAccessReview", api.create(&post(), &request))
                .await?;
            Ok(answer.status.is_some_and(|s| s.allowed))
        })
    }

    fn report_offender<'a>(&'a self, offender: &'a Offender) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let (namespace, name) = offender
                .pod
                .clone()
                .unwrap_or_else(|| (self.namespace.clone(), self.shared.config.identity.clone()));
            let regarding = ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                namespace: Some(namespace),
                name: Some(name),
                ..ObjectReference::default()
            };
            let who = match (&offender.user, offender.peer) {
                (Some(u), Some(p)) => format!("{u} from {p}"),
                (Some(u), None) => u.clone(),
                (None, Some(p)) => p.to_string(),
                (None, None) => "an unknown peer".into(),
            };
            self.shared
                .events
                .publish(
                    &regarding,
                    EventSpec {
                        type_: EventType::Warning,
                        reason: "CallerRefused",
                        action: "Authenticate",
                        note: format!(
                            "gpuscale refused {who} {} times within the offender window (last: {})",
                            offender.refusals, offender.reason
                        ),
                        related: None,
                    },
                )
                .await;
        })
    }
}
