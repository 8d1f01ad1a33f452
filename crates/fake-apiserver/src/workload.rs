//! Minimal workload controllers, run after every change until nothing moves:
//! Deployment → one ReplicaSet per pod template (a template change replaces
//! all pods at once; no rolling update), ReplicaSet → pods with the real
//! scale-down victim order, StatefulSet → ordinal pods (highest removed first).

use std::cmp::Ordering;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::kubelet::{condition, is_ready, node_name, phase};
use crate::resource::ResourceType;
use crate::store::{ObjectKey, State, meta_str};
use crate::write::{self, DELETION_COST, Part};

/// Runs the controllers until they stop changing anything (bounded).
pub(crate) fn reconcile(state: &mut State) {
    for _ in 0..16 {
        let before = state.rv;
        for (key, d) in state.list("apps", "deployments", None) {
            reconcile_deployment(state, &key, &d);
        }
        for (key, rs) in state.list("apps", "replicasets", None) {
            reconcile_replicaset(state, &key, &rs);
        }
        for (key, sts) in state.list("apps", "statefulsets", None) {
            reconcile_statefulset(state, &key, &sts);
        }
        if state.rv == before {
            break;
        }
    }
}

fn rt(state: &State, group: &str, plural: &str) -> Option<ResourceType> {
    state.registry.any_version(group, plural).cloned()
}

fn uid(obj: &Value) -> &str {
    meta_str(obj, "uid").unwrap_or("")
}

fn controller_uid(obj: &Value) -> Option<&str> {
    obj.pointer("/metadata/ownerReferences")?
        .as_array()?
        .iter()
        .find(|r| r.get("controller").and_then(Value::as_bool) == Some(true))?
        .get("uid")?
        .as_str()
}

fn owned_by(
    state: &State,
    group: &str,
    plural: &str,
    namespace: &str,
    owner: &Value,
) -> Vec<(ObjectKey, Value)> {
    let owner_uid = uid(owner);
    state
        .list(group, plural, Some(namespace))
        .into_iter()
        .filter(|(_, v)| controller_uid(v) == Some(owner_uid))
        .collect()
}

fn replicas(obj: &Value) -> i64 {
    obj.pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1)
}

fn owner_ref(owner: &Value, kind: &str) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": kind,
        "name": meta_str(owner, "name").unwrap_or(""),
        "uid": uid(owner),
        "controller": true,
        "blockOwnerDeletion": true,
    })
}

/// FNV-1a of the template, as a short name-safe hash (like `pod-template-hash`).
fn template_hash(template: &Value) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in template.to_string().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (0..10)
        .map(|i| char::from(ALPHABET[((h >> (i * 6)) % ALPHABET.len() as u64) as usize]))
        .collect()
}

/// Writes a new status when it differs, keeping condition transition times.
fn write_status(
    state: &mut State,
    group: &str,
    plural: &str,
    key: &ObjectKey,
    obj: &Value,
    status: Value,
) {
    if obj.get("status") == Some(&status) {
        return;
    }
    let Some(rt) = rt(state, group, plural) else {
        return;
    };
    let mut next = obj.clone();
    if let Some(m) = next.as_object_mut() {
        m.insert("status".to_string(), status);
        if let Some(meta) = m.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
        }
    }
    if let Err(e) = write::replace(state, &rt, key, next, Part::Status, false) {
        tracing::warn!(object = %key.name, error = %e.message, "fake controller could not write status");
    }
}

fn write_spec_replicas(
    state: &mut State,
    group: &str,
    plural: &str,
    key: &ObjectKey,
    obj: &Value,
    n: i64,
) {
    let Some(rt) = rt(state, group, plural) else {
        return;
    };
    let mut next = obj.clone();
    if let Some(spec) = next.get_mut("spec").and_then(Value::as_object_mut) {
        spec.insert("replicas".to_string(), json!(n));
    }
    if let Some(meta) = next.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
    }
    if let Err(e) = write::replace(state, &rt, key, next, Part::Main, false) {
        tracing::warn!(object = %key.name, error = %e.message, "fake controller could not scale");
    }
}

fn condition_entry(
    old: Option<&Value>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    now: &str,
) -> Value {
    let status_str = if status { "True" } else { "False" };
    let prev = old
        .and_then(|s| s.get("conditions"))
        .and_then(Value::as_array)
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.get("type").and_then(Value::as_str) == Some(type_))
        });
    let same = prev.is_some_and(|p| {
        p.get("status").and_then(Value::as_str) == Some(status_str)
            && p.get("reason").and_then(Value::as_str) == Some(reason)
    });
    if same && let Some(p) = prev {
        return p.clone();
    }
    let transition = match prev {
        Some(p) if p.get("status").and_then(Value::as_str) == Some(status_str) => {
            p.get("lastTransitionTime").cloned().unwrap_or(json!(now))
        }
        _ => json!(now),
    };
    json!({"type": type_, "status": status_str, "reason": reason, "message": message,
           "lastUpdateTime": now, "lastTransitionTime": transition})
}

fn reconcile_deployment(state: &mut State, key: &ObjectKey, d: &Value) {
    let Some(template) = d.pointer("/spec/template").cloned() else {
        return;
    };
    let hash = template_hash(&template);
    let rs_name = format!("{}-{}", key.name, hash);
    let desired = replicas(d);
    let owned = owned_by(state, "apps", "replicasets", &key.namespace, d);
    for (rs_key, rs) in &owned {
        if rs_key.name != rs_name && replicas(rs) != 0 {
            write_spec_replicas(state, "apps", "replicasets", rs_key, rs, 0);
        }
    }
    let rs_key = ObjectKey::new("apps", "replicasets", &key.namespace, &rs_name);
    match state.get(&rs_key).cloned() {
        Some(rs) => {
            if replicas(&rs) != desired {
                write_spec_replicas(state, "apps", "replicasets", &rs_key, &rs, desired);
            }
        }
        None => {
            let mut rs_template = template.clone();
            if let Some(meta) = rs_template
                .as_object_mut()
                .map(|t| t.entry("metadata".to_string()).or_insert_with(|| json!({})))
                .and_then(Value::as_object_mut)
            {
                let labels = meta
                    .entry("labels".to_string())
                    .or_insert_with(|| json!({}));
                if let Some(l) = labels.as_object_mut() {
                    l.insert("pod-template-hash".to_string(), json!(hash));
                }
            }
            let mut selector = d.pointer("/spec/selector").cloned().unwrap_or(json!({}));
            if let Some(sel) = selector.as_object_mut() {
                let ml = sel
                    .entry("matchLabels".to_string())
                    .or_insert_with(|| json!({}));
                if let Some(ml) = ml.as_object_mut() {
                    ml.insert("pod-template-hash".to_string(), json!(hash));
                }
            }
            let labels = rs_template
                .pointer("/metadata/labels")
                .cloned()
                .unwrap_or(json!({}));
            let rs = json!({
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "metadata": {
                    "name": rs_name,
                    "namespace": key.namespace,
                    "labels": labels,
                    "annotations": {"deployment.kubernetes.io/desired-replicas": desired.to_string()},
                    "ownerReferences": [owner_ref(d, "Deployment")],
                },
                "spec": {
                    "replicas": desired,
                    "selector": selector,
                    "template": rs_template,
                    "minReadySeconds": d.pointer("/spec/minReadySeconds").cloned().unwrap_or(json!(0)),
                },
            });
            if let Some(rt) = rt(state, "apps", "replicasets")
                && let Err(e) = write::create(state, &rt, &key.namespace, rs, false)
            {
                tracing::warn!(deployment = %key.name, error = %e.message, "fake controller could not create a ReplicaSet");
            }
        }
    }
    let owned = owned_by(state, "apps", "replicasets", &key.namespace, d);
    let sum = |field: &str| -> i64 {
        owned
            .iter()
            .map(|(_, rs)| {
                rs.pointer(&format!("/status/{field}"))
                    .and_then(Value::as_i64)
                    .unwrap_or(0)
            })
            .sum()
    };
    let (total, ready, available) = (
        sum("replicas"),
        sum("readyReplicas"),
        sum("availableReplicas"),
    );
    let updated = owned
        .iter()
        .find(|(k, _)| k.name == rs_name)
        .and_then(|(_, rs)| rs.pointer("/status/replicas").and_then(Value::as_i64))
        .unwrap_or(0);
    let now = state.clock.now_rfc3339();
    let old_status = d.get("status");
    let max_unavailable = desired / 4;
    let is_available = available >= desired - max_unavailable;
    let complete = updated == desired && available == desired && total == desired;
    let mut status = json!({
        "observedGeneration": d.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
        "replicas": total,
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": available,
        "unavailableReplicas": (desired - available).max(0),
        "conditions": [
            condition_entry(old_status, "Available", is_available,
                if is_available { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" },
                if is_available { "Deployment has minimum availability." } else { "Deployment does not have minimum availability." }, &now),
            condition_entry(old_status, "Progressing", true,
                if complete { "NewReplicaSetAvailable" } else { "ReplicaSetUpdated" },
                &format!("ReplicaSet \"{rs_name}\" is progressing."), &now),
        ],
    });
    strip_zero(&mut status);
    write_status(state, "apps", "deployments", key, d, status);
}

/// Go's `omitempty`: zero counts are left out of workload status.
fn strip_zero(status: &mut Value) {
    if let Some(m) = status.as_object_mut() {
        m.retain(|k, v| k == "replicas" || v.as_i64() != Some(0));
    }
}

fn new_pod(
    state: &mut State,
    namespace: &str,
    name: Option<String>,
    generate_name: &str,
    template: &Value,
    owner: Value,
    extra_labels: &[(String, String)],
) {
    let mut meta = template.get("metadata").cloned().unwrap_or(json!({}));
    if let Some(m) = meta.as_object_mut() {
        m.remove("name");
        m.remove("namespace");
        match &name {
            Some(n) => {
                m.insert("name".to_string(), json!(n));
            }
            None => {
                m.insert("generateName".to_string(), json!(generate_name));
            }
        }
        m.insert("ownerReferences".to_string(), json!([owner]));
        let labels = m.entry("labels".to_string()).or_insert_with(|| json!({}));
        if let Some(l) = labels.as_object_mut() {
            for (k, v) in extra_labels {
                l.insert(k.clone(), json!(v));
            }
        }
    }
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": template.get("spec").cloned().unwrap_or(json!({})),
    });
    if let Some(rt) = rt(state, "", "pods")
        && let Err(e) = write::create(state, &rt, namespace, pod, false)
    {
        tracing::warn!(owner = %generate_name, error = %e.message, "fake controller could not create a pod");
    }
}

fn reconcile_replicaset(state: &mut State, key: &ObjectKey, rs: &Value) {
    let desired = replicas(rs).max(0) as usize;
    let Some(template) = rs.pointer("/spec/template").cloned() else {
        return;
    };
    let pods = owned_by(state, "", "pods", &key.namespace, rs);
    if pods.len() < desired {
        for _ in pods.len()..desired {
            new_pod(
                state,
                &key.namespace,
                None,
                &format!("{}-", key.name),
                &template,
                owner_ref(rs, "ReplicaSet"),
                &[],
            );
        }
    } else if pods.len() > desired {
        let victims = rank_victims(state, pods, pods_of_related(state, rs));
        let excess = victims.len() - desired;
        for (pod_key, _) in victims.into_iter().take(excess) {
            if let Some(rt) = rt(state, "", "pods") {
                let _ = write::delete(state, &rt, &pod_key, None);
            }
        }
    }
    let pods = owned_by(state, "", "pods", &key.namespace, rs);
    let ready = pods.iter().filter(|(_, p)| is_ready(p)).count() as i64;
    let min_ready = rs
        .pointer("/spec/minReadySeconds")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let now = state.clock.now();
    let available = pods
        .iter()
        .filter(|(_, p)| is_ready(p) && ready_for(p, now) >= min_ready)
        .count() as i64;
    let mut status = json!({
        "replicas": pods.len(),
        "fullyLabeledReplicas": pods.len(),
        "readyReplicas": ready,
        "availableReplicas": available,
        "observedGeneration": rs.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
    });
    strip_zero(&mut status);
    write_status(state, "apps", "replicasets", key, rs, status);
}

/// The pods of every ReplicaSet of the same Deployment, for the co-location rank.
fn pods_of_related(state: &State, rs: &Value) -> Vec<Value> {
    let ns = meta_str(rs, "namespace").unwrap_or("");
    let siblings: Vec<Value> = match controller_uid(rs) {
        Some(owner) => state
            .list("apps", "replicasets", Some(ns))
            .into_iter()
            .filter(|(_, r)| controller_uid(r) == Some(owner))
            .map(|(_, r)| r)
            .collect(),
        None => vec![rs.clone()],
    };
    siblings
        .iter()
        .flat_map(|s| {
            owned_by(state, "", "pods", ns, s)
                .into_iter()
                .map(|(_, p)| p)
        })
        .collect()
}

fn parse_time(v: Option<&Value>) -> Option<DateTime<Utc>> {
    v.and_then(Value::as_str)
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

fn ready_since(pod: &Value) -> Option<DateTime<Utc>> {
    condition(pod, "Ready").and_then(|c| parse_time(c.get("lastTransitionTime")))
}

fn ready_for(pod: &Value, now: DateTime<Utc>) -> i64 {
    ready_since(pod).map_or(0, |t| (now - t).num_seconds())
}

fn deletion_cost(pod: &Value) -> i32 {
    pod.pointer("/metadata/annotations")
        .and_then(|a| a.get(DELETION_COST))
        .and_then(Value::as_str)
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn restarts(pod: &Value) -> i64 {
    pod.pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c.get("restartCount").and_then(Value::as_i64))
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

/// Sorts pods so the ones the ReplicaSet controller deletes first come first
/// (`ActivePodsWithRanks.Less`, kubernetes `pkg/controller/controller_utils.go`).
pub(crate) fn rank_victims(
    state: &State,
    mut pods: Vec<(ObjectKey, Value)>,
    related: Vec<Value>,
) -> Vec<(ObjectKey, Value)> {
    let mut per_node: HashMap<String, i64> = HashMap::new();
    for p in &related {
        let n = node_name(p);
        if !n.is_empty() {
            *per_node.entry(n.to_string()).or_default() += 1;
        }
    }
    let now = state.clock.now();
    let rank = |p: &Value| per_node.get(node_name(p)).copied().unwrap_or(0);
    let phase_ord = |p: &Value| match phase(p) {
        "Pending" => 0,
        "Unknown" => 1,
        "Running" => 2,
        _ => 0,
    };
    // Log-scale buckets of time Ready (LogarithmicScaleDown, on by default).
    let ready_bucket = |p: &Value| -> i64 {
        let secs = ready_for(p, now).max(0);
        if secs == 0 {
            0
        } else {
            i64::from(63 - (secs as u64).leading_zeros()) + 1
        }
    };
    let created = |p: &Value| parse_time(p.pointer("/metadata/creationTimestamp"));
    let seq = |p: &Value| state.created_seq.get(uid(p)).copied().unwrap_or(0);
    pods.sort_by(|(_, a), (_, b)| {
        let assigned = |p: &Value| !node_name(p).is_empty();
        assigned(a)
            .cmp(&assigned(b))
            .then(phase_ord(a).cmp(&phase_ord(b)))
            .then(is_ready(a).cmp(&is_ready(b)))
            .then(deletion_cost(a).cmp(&deletion_cost(b)))
            .then(rank(b).cmp(&rank(a)))
            .then_with(|| {
                if is_ready(a) && is_ready(b) {
                    ready_bucket(a).cmp(&ready_bucket(b))
                } else {
                    Ordering::Equal
                }
            })
            .then(restarts(b).cmp(&restarts(a)))
            .then_with(|| match (created(a), created(b)) {
                (Some(x), Some(y)) => y.cmp(&x),
                _ => Ordering::Equal,
            })
            .then(seq(b).cmp(&seq(a)))
    });
    pods
}

fn reconcile_statefulset(state: &mut State, key: &ObjectKey, sts: &Value) {
    let desired = replicas(sts).max(0) as usize;
    let Some(template) = sts.pointer("/spec/template").cloned() else {
        return;
    };
    let parallel = sts
        .pointer("/spec/podManagementPolicy")
        .and_then(Value::as_str)
        == Some("Parallel");
    let hash = template_hash(&template);
    let pods = owned_by(state, "", "pods", &key.namespace, sts);
    let ordinal = |name: &str| -> Option<usize> {
        name.strip_prefix(&format!("{}-", key.name))
            .and_then(|s| s.parse().ok())
    };
    let mut by_ordinal: HashMap<usize, Value> = HashMap::new();
    for (k, p) in &pods {
        if let Some(i) = ordinal(&k.name) {
            by_ordinal.insert(i, p.clone());
        }
    }
    // Scale down: highest ordinals first.
    let mut excess: Vec<(usize, ObjectKey)> = pods
        .iter()
        .filter_map(|(k, _)| {
            ordinal(&k.name)
                .filter(|i| *i >= desired)
                .map(|i| (i, k.clone()))
        })
        .collect();
    excess.sort_by_key(|e| std::cmp::Reverse(e.0));
    for (_, pod_key) in excess {
        if let Some(rt) = rt(state, "", "pods") {
            let _ = write::delete(state, &rt, &pod_key, None);
        }
    }
    for i in 0..desired {
        if by_ordinal.contains_key(&i) {
            continue;
        }
        if !parallel && !(0..i).all(|j| by_ordinal.get(&j).is_some_and(is_ready)) {
            break;
        }
        let name = format!("{}-{}", key.name, i);
        let labels = vec![
            (
                "statefulset.kubernetes.io/pod-name".to_string(),
                name.clone(),
            ),
            ("apps.kubernetes.io/pod-index".to_string(), i.to_string()),
            (
                "controller-revision-hash".to_string(),
                format!("{}-{}", key.name, hash),
            ),
        ];
        let mut tpl = template.clone();
        if let Some(spec) = tpl.get_mut("spec").and_then(Value::as_object_mut) {
            spec.insert("hostname".to_string(), json!(name));
            if let Some(svc) = sts.pointer("/spec/serviceName") {
                spec.insert("subdomain".to_string(), svc.clone());
            }
        }
        new_pod(
            state,
            &key.namespace,
            Some(name),
            "",
            &tpl,
            owner_ref(sts, "StatefulSet"),
            &labels,
        );
        if !parallel {
            break;
        }
    }
    let pods = owned_by(state, "", "pods", &key.namespace, sts);
    let ready = pods.iter().filter(|(_, p)| is_ready(p)).count() as i64;
    let mut status = json!({
        "replicas": pods.len(),
        "readyReplicas": ready,
        "availableReplicas": ready,
        "currentReplicas": pods.len(),
        "updatedReplicas": pods.len(),
        "currentRevision": format!("{}-{}", key.name, hash),
        "updateRevision": format!("{}-{}", key.name, hash),
        "observedGeneration": sts.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
    });
    strip_zero(&mut status);
    write_status(state, "apps", "statefulsets", key, sts, status);
}
