//! The resource types the server serves: the built-in ones and those that a
//! CustomResourceDefinition registers at run time.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// Where a custom resource keeps the numbers its `/scale` subresource shows,
/// as JSON paths of the form `.spec.replicas` (the CRD's `scale` block).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScalePaths {
    /// `.spec.replicas` for the built-in workloads.
    pub spec_replicas: String,
    /// `.status.replicas` for the built-in workloads.
    pub status_replicas: String,
    /// Where the label selector string lives, if the resource declares one.
    pub label_selector: Option<String>,
}

/// One resource type (a plural under a group/version), as discovery shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceType {
    /// API group; empty for the core group.
    pub group: String,
    /// API version within the group, e.g. `v1`.
    pub version: String,
    /// The plural resource name used in URLs, e.g. `pods`.
    pub plural: String,
    /// The singular name, e.g. `pod`.
    pub singular: String,
    /// The object kind, e.g. `Pod`.
    pub kind: String,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// Short names, e.g. `po`.
    pub short_names: Vec<String>,
    /// Whether `/status` is a separate subresource (the main resource then never changes status).
    pub status_subresource: bool,
    /// The `/scale` subresource, if the type has one.
    pub scale: Option<ScalePaths>,
    /// Whether this type came from a CustomResourceDefinition.
    pub custom: bool,
    /// The CRD's `openAPIV3Schema` for this version, used to prune unknown fields.
    pub schema: Option<Value>,
}

impl ResourceType {
    /// `group/version`, or just `version` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// TokenReview and SubjectAccessReview: answered, never stored.
    pub fn is_review(&self) -> bool {
        matches!(
            (self.group.as_str(), self.plural.as_str()),
            ("authentication.k8s.io", "tokenreviews")
                | ("authorization.k8s.io", "subjectaccessreviews")
        )
    }

    fn builtin(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        Self {
            group: group.to_string(),
            version: version.to_string(),
            plural: plural.to_string(),
            singular: kind.to_ascii_lowercase(),
            kind: kind.to_string(),
            namespaced,
            short_names: Vec::new(),
            status_subresource: false,
            scale: None,
            custom: false,
            schema: None,
        }
    }

    fn short(mut self, names: &[&str]) -> Self {
        self.short_names = names.iter().map(|s| (*s).to_string()).collect();
        self
    }

    fn with_status(mut self) -> Self {
        self.status_subresource = true;
        self
    }

    fn with_builtin_scale(mut self) -> Self {
        self.scale = Some(ScalePaths {
            spec_replicas: ".spec.replicas".to_string(),
            status_replicas: ".status.replicas".to_string(),
            label_selector: None,
        });
        self
    }

    /// The verbs discovery lists for the main resource.
    pub fn verbs(&self) -> Vec<&'static str> {
        if self.is_review() {
            return vec!["create"];
        }
        vec![
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ]
    }

    /// The discovery entries (APIResource) for this type and its subresources.
    pub fn discovery_entries(&self) -> Vec<Value> {
        let mut out = vec![json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": self.verbs(),
            "shortNames": self.short_names,
        })];
        if self.status_subresource {
            out.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if self.scale.is_some() {
            out.push(json!({
                "name": format!("{}/scale", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            }));
        }
        out
    }
}

/// All served resource types, keyed by (group, version, plural).
#[derive(Debug, Clone)]
pub(crate) struct Registry {
    types: BTreeMap<(String, String, String), ResourceType>,
}

impl Registry {
    pub(crate) fn with_builtins() -> Self {
        let list = vec![
            ResourceType::builtin("", "v1", "pods", "Pod", true)
                .short(&["po"])
                .with_status(),
            ResourceType::builtin("", "v1", "services", "Service", true)
                .short(&["svc"])
                .with_status(),
            ResourceType::builtin("", "v1", "events", "Event", true).short(&["ev"]),
            ResourceType::builtin("", "v1", "nodes", "Node", false)
                .short(&["no"])
                .with_status(),
            ResourceType::builtin("", "v1", "namespaces", "Namespace", false)
                .short(&["ns"])
                .with_status(),
            ResourceType::builtin("", "v1", "configmaps", "ConfigMap", true).short(&["cm"]),
            ResourceType::builtin("", "v1", "serviceaccounts", "ServiceAccount", true)
                .short(&["sa"]),
            ResourceType::builtin("apps", "v1", "deployments", "Deployment", true)
                .short(&["deploy"])
                .with_status()
                .with_builtin_scale(),
            ResourceType::builtin("apps", "v1", "replicasets", "ReplicaSet", true)
                .short(&["rs"])
                .with_status()
                .with_builtin_scale(),
            ResourceType::builtin("apps", "v1", "statefulsets", "StatefulSet", true)
                .short(&["sts"])
                .with_status()
                .with_builtin_scale(),
            ResourceType::builtin("apps", "v1", "daemonsets", "DaemonSet", true)
                .short(&["ds"])
                .with_status(),
            ResourceType::builtin("coordination.k8s.io", "v1", "leases", "Lease", true),
            // Stored as written (no RBAC is enforced, no policy applied):
            // for `kubectl apply --dry-run=client` of the manifests.
            ResourceType::builtin(
                "rbac.authorization.k8s.io",
                "v1",
                "clusterroles",
                "ClusterRole",
                false,
            ),
            ResourceType::builtin(
                "rbac.authorization.k8s.io",
                "v1",
                "clusterrolebindings",
                "ClusterRoleBinding",
                false,
            ),
            ResourceType::builtin("rbac.authorization.k8s.io", "v1", "roles", "Role", true),
            ResourceType::builtin(
                "rbac.authorization.k8s.io",
                "v1",
                "rolebindings",
                "RoleBinding",
                true,
            ),
            ResourceType::builtin(
                "networking.k8s.io",
                "v1",
                "networkpolicies",
                "NetworkPolicy",
                true,
            )
            .short(&["netpol"]),
            ResourceType::builtin("events.k8s.io", "v1", "events", "Event", true).short(&["ev"]),
            // Create-only reviews, answered and never stored (crate::auth).
            ResourceType::builtin(
                "authentication.k8s.io",
                "v1",
                "tokenreviews",
                "TokenReview",
                false,
            ),
            ResourceType::builtin(
                "authorization.k8s.io",
                "v1",
                "subjectaccessreviews",
                "SubjectAccessReview",
                false,
            ),
            ResourceType::builtin(
                "apiextensions.k8s.io",
                "v1",
                "customresourcedefinitions",
                "CustomResourceDefinition",
                false,
            )
            .short(&["crd", "crds"])
            .with_status(),
        ];
        let mut types = BTreeMap::new();
        for t in list {
            types.insert((t.group.clone(), t.version.clone(), t.plural.clone()), t);
        }
        Self { types }
    }

    pub(crate) fn get(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceType> {
        self.types
            .get(&(group.to_string(), version.to_string(), plural.to_string()))
    }

    /// Any served version of (group, plural); used by controllers that do not care which.
    pub(crate) fn any_version(&self, group: &str, plural: &str) -> Option<&ResourceType> {
        self.types
            .values()
            .find(|t| t.group == group && t.plural == plural)
    }

    pub(crate) fn all(&self) -> impl Iterator<Item = &ResourceType> {
        self.types.values()
    }

    /// Groups (other than core) with their versions, in a stable order.
    pub(crate) fn groups(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for t in self.types.values() {
            if t.group.is_empty() {
                continue;
            }
            let versions = out.entry(t.group.clone()).or_default();
            if !versions.contains(&t.version) {
                versions.push(t.version.clone());
            }
        }
        out
    }

    pub(crate) fn insert(&mut self, t: ResourceType) {
        self.types
            .insert((t.group.clone(), t.version.clone(), t.plural.clone()), t);
    }

    pub(crate) fn remove_custom(&mut self, group: &str, plural: &str) {
        self.types
            .retain(|(g, _, p), t| !(t.custom && g == group && p == plural));
    }
}

/// Why a CustomResourceDefinition cannot be served.
pub(crate) fn crd_types(crd: &Value) -> Result<Vec<ResourceType>, String> {
    let spec = crd.get("spec").ok_or("spec: Required value")?;
    let group = spec
        .get("group")
        .and_then(Value::as_str)
        .filter(|g| !g.is_empty())
        .ok_or("spec.group: Required value")?;
    let names = spec.get("names").ok_or("spec.names: Required value")?;
    let plural = names
        .get("plural")
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
        .ok_or("spec.names.plural: Required value")?;
    let kind = names
        .get("kind")
        .and_then(Value::as_str)
        .filter(|k| !k.is_empty())
        .ok_or("spec.names.kind: Required value")?;
    let singular = names
        .get("singular")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| kind.to_ascii_lowercase());
    let short_names: Vec<String> = names
        .get("shortNames")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let expected_name = format!("{plural}.{group}");
    let name = crd
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if name != expected_name {
        return Err(format!(
            "metadata.name: Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group (\"{expected_name}\")"
        ));
    }
    let namespaced = match spec.get("scope").and_then(Value::as_str) {
        Some("Namespaced") => true,
        Some("Cluster") => false,
        other => {
            return Err(format!(
                "spec.scope: Unsupported value: {other:?}: supported values: \"Cluster\", \"Namespaced\""
            ));
        }
    };
    let versions = spec
        .get("versions")
        .and_then(Value::as_array)
        .filter(|v| !v.is_empty())
        .ok_or(
            "spec.versions: Invalid value: must have exactly one version marked as storage version",
        )?;
    let storage_count = versions
        .iter()
        .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        .count();
    if storage_count != 1 {
        return Err(
            "spec.versions: Invalid value: must have exactly one version marked as storage version"
                .to_string(),
        );
    }
    let mut out = Vec::new();
    for v in versions {
        let vname = v
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or("spec.versions[].name: Required value")?;
        if v.get("served").and_then(Value::as_bool) != Some(true) {
            continue;
        }
        let subresources = v.get("subresources");
        let status_subresource = subresources.and_then(|s| s.get("status")).is_some();
        let scale = match subresources.and_then(|s| s.get("scale")) {
            Some(scale) => {
                let spec_replicas = scale
                    .get("specReplicasPath")
                    .and_then(Value::as_str)
                    .ok_or(format!(
                        "spec.versions[{vname}].subresources.scale.specReplicasPath: Required value"
                    ))?;
                let status_replicas = scale
                    .get("statusReplicasPath")
                    .and_then(Value::as_str)
                    .ok_or(format!(
                        "spec.versions[{vname}].subresources.scale.statusReplicasPath: Required value"
                    ))?;
                Some(ScalePaths {
                    spec_replicas: spec_replicas.to_string(),
                    status_replicas: status_replicas.to_string(),
                    label_selector: scale
                        .get("labelSelectorPath")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                })
            }
            None => None,
        };
        out.push(ResourceType {
            group: group.to_string(),
            version: vname.to_string(),
            plural: plural.to_string(),
            singular: singular.clone(),
            kind: kind.to_string(),
            namespaced,
            short_names: short_names.clone(),
            status_subresource,
            scale,
            custom: true,
            schema: v.pointer("/schema/openAPIV3Schema").cloned(),
        });
    }
    Ok(out)
}

/// Reads a `.a.b.c` path (as CRD scale paths are written) from an object.
pub(crate) fn get_dotted<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = obj;
    for part in path.trim_start_matches('.').split('.') {
        cur = cur.get(part)?;
    }
    Some(cur)
}

/// Writes a `.a.b.c` path, creating objects on the way.
pub(crate) fn set_dotted(obj: &mut Value, path: &str, value: Value) {
    let parts: Vec<&str> = path.trim_start_matches('.').split('.').collect();
    let mut cur = obj;
    for (i, part) in parts.iter().enumerate() {
        if !cur.is_object() {
            *cur = Value::Object(serde_json::Map::new());
        }
        let Value::Object(map) = cur else {
            return;
        };
        if i + 1 == parts.len() {
            map.insert((*part).to_string(), value);
            return;
        }
        cur = map
            .entry((*part).to_string())
            .or_insert_with(|| Value::Object(serde_json::Map::new()));
    }
}
