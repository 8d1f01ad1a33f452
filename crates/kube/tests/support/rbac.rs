//! The shipped RBAC (deploy/base/rbac.yaml) against the requests the scaler
//! made, from the fake API server's request log.

use std::collections::BTreeSet;

use gpuscale_fake_apiserver::RequestRecord;
use serde_json::Value;

use super::{LEASE_NS, scaler_requests};

/// One grant: API group, resource (or `resource/subresource`), verb, and
/// the namespace a Role limits it to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Grant {
    pub group: String,
    pub resource: String,
    pub verb: String,
    pub namespace: Option<String>,
}

fn rbac_docs() -> Vec<Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/base/rbac.yaml");
    let text = std::fs::read_to_string(path).expect("deploy/base/rbac.yaml");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML"))
        .collect::<Vec<Value>>()
        .into_iter()
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// What the scaler's service account is granted: the rules of the roles
/// bound to it (the Role is in the scaler's namespace, as the base's
/// kustomization puts it).
pub fn scaler_grants() -> BTreeSet<Grant> {
    let docs = rbac_docs();
    let bound: BTreeSet<(String, String)> = docs
        .iter()
        .filter(|d| {
            matches!(
                d["kind"].as_str(),
                Some("ClusterRoleBinding" | "RoleBinding")
            )
        })
        .filter(|d| {
            d["subjects"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["name"] == "gpuscale-scaler"))
        })
        .map(|d| {
            (
                d["roleRef"]["kind"].as_str().unwrap().to_string(),
                d["roleRef"]["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut grants = BTreeSet::new();
    for d in &docs {
        let kind = d["kind"].as_str().unwrap_or("");
        let name = d["metadata"]["name"].as_str().unwrap_or("");
        if !bound.contains(&(kind.to_string(), name.to_string())) {
            continue;
        }
        let namespace = (kind == "Role").then(|| LEASE_NS.to_string());
        for rule in d["rules"].as_array().into_iter().flatten() {
            let list = |k: &str| -> Vec<String> {
                rule[k]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect()
            };
            for group in list("apiGroups") {
                for resource in list("resources") {
                    for verb in list("verbs") {
                        assert_ne!(verb, "*", "no wildcard verbs");
                        assert_ne!(resource, "*", "no wildcard resources");
                        grants.insert(Grant {
                            group: group.clone(),
                            resource: resource.clone(),
                            verb,
                            namespace: namespace.clone(),
                        });
                    }
                }
            }
        }
    }
    grants
}

/// The grant a request needs (`None` for discovery and other non-resource
/// paths, which the default system:discovery role allows).
pub fn needed(r: &RequestRecord) -> Option<Grant> {
    if !r.is_resource_request() {
        return None;
    }
    Some(Grant {
        group: r.group.clone(),
        resource: r.rbac_resource(),
        verb: r.verb.as_str().to_string(),
        namespace: r.namespace.clone(),
    })
}

fn allows(grants: &BTreeSet<Grant>, need: &Grant) -> bool {
    grants.iter().any(|g| {
        g.group == need.group
            && g.resource == need.resource
            && g.verb == need.verb
            && g.namespace
                .as_ref()
                .is_none_or(|ns| need.namespace.as_ref() == Some(ns))
    })
}

/// Every request the scaler made in `log` is allowed by the shipped roles.
pub fn assert_allowed(log: &[RequestRecord]) {
    let grants = scaler_grants();
    let denied: Vec<Grant> = scaler_requests(log)
        .iter()
        .filter_map(needed)
        .filter(|n| !allows(&grants, n))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert!(denied.is_empty(), "the shipped RBAC denies: {denied:#?}");
}

/// The grants the requests in `log` used (namespace-free for cluster roles).
pub fn used(log: &[RequestRecord]) -> BTreeSet<Grant> {
    let grants = scaler_grants();
    scaler_requests(log)
        .iter()
        .filter_map(needed)
        .filter_map(|n| {
            grants
                .iter()
                .find(|g| {
                    g.group == n.group
                        && g.resource == n.resource
                        && g.verb == n.verb
                        && g.namespace
                            .as_ref()
                            .is_none_or(|ns| n.namespace.as_ref() == Some(ns))
                })
                .cloned()
        })
        .collect()
}
