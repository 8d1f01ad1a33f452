//! The scale target: anything with a `/scale` subresource, found by
//! `apiVersion`/`kind`/`name` through discovery, read and written through
//! `/scale`, its pods selected by `/scale`'s `status.selector` (or the
//! target's `spec.selector` when the resource does not publish one).

use gpuscale_policy::spec::TargetRef;
use k8s_openapi::api::autoscaling::v1::Scale;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::core::{GroupVersion, GroupVersionKind, Selector};
use kube::{Api, Client, discovery};
use serde_json::json;

use crate::error::{KubeError, api_status};

/// Why a target cannot be acted on: the condition reason and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TargetProblem {
    /// `TargetKindUnknown`, `TargetNotScalable`, `TargetNotFound`, `TargetHasNoSelector`.
    pub reason: &'static str,
    pub message: String,
}

/// A resolved target.
#[derive(Debug, Clone)]
pub(crate) struct ScaleTarget {
    api: Api<DynamicObject>,
    pub resource: ApiResource,
    pub name: String,
    pub namespace: String,
}

/// `/scale` as read: the desired count, the observed count, the selector and
/// the resourceVersion for an optimistic write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScaleReading {
    pub spec_replicas: u32,
    pub status_replicas: u32,
    pub selector: Option<String>,
    pub resource_version: Option<String>,
}

impl ScaleTarget {
    /// Finds the target of `target` in `namespace`: `Ok(Err(problem))` when
    /// the kind, the subresource or the object does not exist; `Err` when
    /// the API server could not be asked (retry).
    pub async fn resolve(
        client: &Client,
        namespace: &str,
        target: &TargetRef,
    ) -> Result<Result<(ScaleTarget, ScaleReading), TargetProblem>, KubeError> {
        let describe = format!("{} {}/{}", target.kind, target.api_version, target.name);
        let gv: GroupVersion = match target.api_version.parse() {
            Ok(gv) => gv,
            Err(_) => {
                return Ok(Err(TargetProblem {
                    reason: "TargetKindUnknown",
                    message: format!(
                        "spec.target.apiVersion {:?} is not a group/version such as apps/v1",
                        target.api_version
                    ),
                }));
            }
        };
        let gvk = GroupVersionKind::gvk(&gv.group, &gv.version, &target.kind);
        let (resource, caps) = match discovery::pinned_kind(client, &gvk).await {
            Ok(found) => found,
            Err(kube::Error::Discovery(_)) => {
                return Ok(Err(TargetProblem {
                    reason: "TargetKindUnknown",
                    message: format!(
                        "the API server serves no kind {} in {}",
                        target.kind, target.api_version
                    ),
                }));
            }
            Err(e) if api_status(&e) == Some(404) => {
                return Ok(Err(TargetProblem {
                    reason: "TargetKindUnknown",
                    message: format!(
                        "the API server serves no {} (looking for kind {})",
                        target.api_version, target.kind
                    ),
                }));
            }
            Err(e) => return Err(KubeError::api(format!("discovering {describe}"), e)),
        };
        if !caps
            .subresources
            .iter()
            .any(|(sub, _)| sub.plural == "scale")
        {
            return Ok(Err(TargetProblem {
                reason: "TargetNotScalable",
                message: format!(
                    "{} ({}) has no /scale subresource; gpuscale scales only through /scale",
                    target.kind, resource.plural
                ),
            }));
        }
        let api = Api::namespaced_with(client.clone(), namespace, &resource);
        let t = ScaleTarget {
            api,
            resource,
            name: target.name.clone(),
            namespace: namespace.to_string(),
        };
        match t.read().await {
            Ok(mut reading) => {
                if reading.selector.is_none() {
                    reading.selector = t.spec_selector().await?;
                }
                if reading.selector.is_none() {
                    return Ok(Err(TargetProblem {
                        reason: "TargetHasNoSelector",
                        message: format!(
                            "{describe} publishes no pod selector (/scale status.selector or spec.selector)"
                        ),
                    }));
                }
                Ok(Ok((t, reading)))
            }
            Err(e) if e.status_code() == Some(404) => Ok(Err(TargetProblem {
                reason: "TargetNotFound",
                message: format!("{describe} does not exist in namespace {namespace}"),
            })),
            Err(e) => Err(e),
        }
    }

    /// `Kind/name`, for messages.
    pub fn describe(&self) -> String {
        format!("{}/{}", self.resource.kind, self.name)
    }

    /// The target as an object reference (for Events).
    pub fn reference(&self) -> k8s_openapi::api::core::v1::ObjectReference {
        k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(self.resource.api_version.clone()),
            kind: Some(self.resource.kind.clone()),
            name: Some(self.name.clone()),
            namespace: Some(self.namespace.clone()),
            ..Default::default()
        }
    }

    /// GET `/scale`.
    pub async fn read(&self) -> Result<ScaleReading, KubeError> {
        let scale = self
            .api
            .get_scale(&self.name)
            .await
            .map_err(|e| KubeError::api(format!("reading {}/scale", self.describe()), e))?;
        Ok(reading(&scale))
    }

    /// Sets `/scale` `spec.replicas` with a merge patch that carries the
    /// resourceVersion read (409 when the target changed since).
    pub async fn write(
        &self,
        replicas: u32,
        resource_version: Option<&str>,
        field_manager: &str,
    ) -> Result<ScaleReading, KubeError> {
        let mut patch = json!({"spec": {"replicas": replicas}});
        if let Some(rv) = resource_version {
            patch["metadata"] = json!({"resourceVersion": rv});
        }
        let params = PatchParams {
            field_manager: Some(field_manager.to_string()),
            ..PatchParams::default()
        };
        let scale = self
            .api
            .patch_scale(&self.name, &params, &Patch::Merge(&patch))
            .await
            .map_err(|e| KubeError::api(format!("writing {}/scale", self.describe()), e))?;
        Ok(reading(&scale))
    }

    /// The target's own `spec.selector` (a LabelSelector or a string).
    async fn spec_selector(&self) -> Result<Option<String>, KubeError> {
        let obj = self
            .api
            .get(&self.name)
            .await
            .map_err(|e| KubeError::api(format!("reading {}", self.describe()), e))?;
        let Some(sel) = obj.data.pointer("/spec/selector") else {
            return Ok(None);
        };
        if let Some(s) = sel.as_str() {
            return Ok(Some(s.to_string()).filter(|s| !s.is_empty()));
        }
        let Ok(ls) = serde_json::from_value::<LabelSelector>(sel.clone()) else {
            return Ok(None);
        };
        Ok(Selector::try_from(ls)
            .ok()
            .map(|s| s.to_string())
            .filter(|s| !s.is_empty()))
    }
}

fn reading(scale: &Scale) -> ScaleReading {
    let n = |v: i32| u32::try_from(v).unwrap_or(0);
    ScaleReading {
        spec_replicas: n(scale.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)),
        status_replicas: n(scale.status.as_ref().map_or(0, |s| s.replicas)),
        selector: scale
            .status
            .as_ref()
            .and_then(|s| s.selector.clone())
            .filter(|s| !s.is_empty()),
        resource_version: scale.metadata.resource_version.clone(),
    }
}
