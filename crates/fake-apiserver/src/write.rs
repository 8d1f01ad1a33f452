//! The write path every change goes through, from a client or from the
//! simulated controllers: defaulting, validation, server-owned metadata,
//! the status/spec split, generation, preconditions, finalizers, garbage
//! collection.

use serde_json::{Value, json};

use crate::error::ApiError;
use crate::kubelet;
use crate::resource::{ResourceType, crd_types};
use crate::schema;
use crate::selector::LabelSelector;
use crate::store::{ObjectKey, State, meta_str, set_meta};

/// Which part of an object a write may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// The main resource: everything but `status` (for types with a status subresource).
    Main,
    /// The `/status` subresource: only `status`.
    Status,
}

pub(crate) const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Creates an object (POST). `namespace` is empty for cluster-scoped types.
pub(crate) fn create(
    state: &mut State,
    rt: &ResourceType,
    namespace: &str,
    mut body: Value,
    dry_run: bool,
) -> Result<Value, ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    check_type(rt, &body)?;
    let body_ns = meta_str(&body, "namespace").unwrap_or("").to_string();
    if rt.namespaced {
        if !body_ns.is_empty() && body_ns != namespace {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        set_meta(&mut body, "namespace", json!(namespace));
    } else if let Some(m) = body.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("namespace");
    }
    let mut name = meta_str(&body, "name").unwrap_or("").to_string();
    if name.is_empty() {
        let Some(prefix) = meta_str(&body, "generateName").map(str::to_string) else {
            return Err(ApiError::invalid(
                &rt.group,
                &rt.kind,
                "",
                "metadata.name: Required value: name or generateName is required",
            ));
        };
        name = format!("{prefix}{}", state.name_suffix(5));
        set_meta(&mut body, "name", json!(name));
    }
    if !valid_name(&name) {
        return Err(ApiError::invalid(
            &rt.group,
            &rt.kind,
            &name,
            format!(
                "metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
            ),
        ));
    }
    let key = ObjectKey::new(&rt.group, &rt.plural, namespace, &name);
    if state.get(&key).is_some() {
        return Err(ApiError::already_exists(&rt.group, &rt.plural, &name));
    }
    let uid = state.uid();
    let now = state.clock.now_rfc3339();
    if let Some(m) = body.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        m.remove("deletionTimestamp");
        m.remove("selfLink");
        m.insert("uid".to_string(), json!(uid));
        m.insert("creationTimestamp".to_string(), json!(now));
        m.insert("generation".to_string(), json!(1));
    }
    if rt.status_subresource
        && let Some(m) = body.as_object_mut()
    {
        m.remove("status");
    }
    default_and_validate(state, rt, &name, &mut body, None)?;
    if rt.group.is_empty() && rt.plural == "pods" {
        kubelet::prepare_new_pod(state, &mut body);
    }
    if dry_run {
        return Ok(body);
    }
    let stored = state.commit(key.clone(), body);
    after_write(state, rt, &key, &stored);
    Ok(stored)
}

fn check_type(rt: &ResourceType, body: &Value) -> Result<(), ApiError> {
    if let Some(kind) = body.get("kind").and_then(Value::as_str)
        && !kind.is_empty()
        && kind != rt.kind
    {
        return Err(ApiError::bad_request(format!(
            "the kind of the provided object ({kind}) does not match the resource ({})",
            rt.kind
        )));
    }
    if let Some(av) = body.get("apiVersion").and_then(Value::as_str)
        && !av.is_empty()
    {
        let group = av.rsplit_once('/').map_or("", |(g, _)| g);
        if group != rt.group {
            return Err(ApiError::bad_request(format!(
                "the API version of the provided object ({av}) does not match the resource's group ({})",
                rt.group
            )));
        }
    }
    Ok(())
}

/// Writes a new version of an existing object (PUT, or the result of a patch).
///
/// Checks the `metadata.resourceVersion` precondition when the new version
/// carries one, keeps server-owned metadata, applies the status/spec split
/// and bumps `generation` on spec changes. A write that changes nothing is
/// not stored and returns the current object.
pub(crate) fn replace(
    state: &mut State,
    rt: &ResourceType,
    key: &ObjectKey,
    mut new: Value,
    part: Part,
    dry_run: bool,
) -> Result<Value, ApiError> {
    let Some(old) = state.get(key).cloned() else {
        return Err(ApiError::not_found(&rt.group, &rt.plural, &key.name));
    };
    if !new.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    check_type(rt, &new)?;
    if let Some(rv) = meta_str(&new, "resourceVersion")
        && !rv.is_empty()
        && Some(rv) != meta_str(&old, "resourceVersion")
    {
        return Err(ApiError::conflict(&rt.group, &rt.plural, &key.name));
    }
    if let Some(name) = meta_str(&new, "name")
        && name != key.name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({name}) does not match the name on the URL ({})",
            key.name
        )));
    }
    if rt.namespaced
        && let Some(ns) = meta_str(&new, "namespace")
        && !ns.is_empty()
        && ns != key.namespace
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }

    let mut next = match part {
        Part::Status => {
            let mut next = old.clone();
            if let Some(m) = next.as_object_mut() {
                match new.get("status") {
                    Some(s) => m.insert("status".to_string(), s.clone()),
                    None => m.remove("status"),
                };
            }
            if let Some(mf) = new.pointer("/metadata/managedFields") {
                set_meta(&mut next, "managedFields", mf.clone());
            }
            next
        }
        Part::Main => {
            if rt.status_subresource
                && let Some(m) = new.as_object_mut()
            {
                match old.get("status") {
                    Some(s) => m.insert("status".to_string(), s.clone()),
                    None => m.remove("status"),
                };
            }
            for field in [
                "uid",
                "creationTimestamp",
                "generation",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "namespace",
                "name",
            ] {
                match old.get("metadata").and_then(|m| m.get(field)) {
                    Some(v) => set_meta(&mut new, field, v.clone()),
                    None => {
                        if let Some(m) = new.get_mut("metadata").and_then(Value::as_object_mut) {
                            m.remove(field);
                        }
                    }
                }
            }
            if new.pointer("/metadata/managedFields").is_none()
                && let Some(mf) = old.pointer("/metadata/managedFields")
            {
                set_meta(&mut new, "managedFields", mf.clone());
            }
            new
        }
    };
    set_meta(
        &mut next,
        "resourceVersion",
        old.pointer("/metadata/resourceVersion")
            .cloned()
            .unwrap_or(Value::Null),
    );
    if let Some(m) = next.as_object_mut() {
        m.insert("apiVersion".to_string(), json!(rt.api_version()));
        m.insert("kind".to_string(), json!(rt.kind));
    }
    if spec_changed(&old, &next) {
        let generation = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        set_meta(&mut next, "generation", json!(generation + 1));
    }
    default_and_validate(state, rt, &key.name, &mut next, Some(&old))?;
    if rt.group.is_empty() && rt.plural == "pods" {
        let now = state.clock.now_rfc3339();
        kubelet::refresh_conditions(&mut next, &now);
    }
    let terminating = meta_str(&old, "deletionTimestamp").is_some();
    if terminating {
        let before = finalizers(&old);
        let added: Vec<&str> = finalizers(&next)
            .into_iter()
            .filter(|f| !before.contains(f))
            .collect();
        if !added.is_empty() {
            return Err(ApiError::invalid(
                &rt.group,
                &rt.kind,
                &key.name,
                format!(
                    "metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers {added:?}"
                ),
            ));
        }
    }
    if next == old || dry_run {
        return Ok(next);
    }
    if terminating && finalizers(&next).is_empty() {
        // The last finalizer is gone: the deletion asked for completes.
        state.objects.insert(key.clone(), next);
        let now = state.clock.now_rfc3339();
        let removed = remove_with_dependents(state, key, &now);
        if rt.group == "apiextensions.k8s.io" && rt.plural == "customresourcedefinitions" {
            unregister_crd(state, &removed);
        }
        return Ok(removed.unwrap_or(Value::Null));
    }
    let stored = state.commit(key.clone(), next);
    after_write(state, rt, key, &stored);
    Ok(stored)
}

/// The object's `metadata.finalizers`.
fn finalizers(obj: &Value) -> Vec<&str> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Whether anything outside `metadata` and `status` changed.
fn spec_changed(old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| -> Value {
        let mut v = v.clone();
        if let Some(m) = v.as_object_mut() {
            m.remove("metadata");
            m.remove("status");
            m.remove("apiVersion");
            m.remove("kind");
        }
        v
    };
    strip(old) != strip(new)
}

/// Deletes an object (and, like the garbage collector, everything it owns).
///
/// An object with finalizers is not removed: as the API server does, the
/// first DELETE sets `deletionTimestamp` (and bumps `generation`), later
/// ones change nothing, and the object goes when a write removes its last
/// finalizer (see [`replace`]).
pub(crate) fn delete(
    state: &mut State,
    rt: &ResourceType,
    key: &ObjectKey,
    preconditions: Option<&Value>,
) -> Result<Value, ApiError> {
    let Some(current) = state.get(key) else {
        return Err(ApiError::not_found(&rt.group, &rt.plural, &key.name));
    };
    if let Some(pre) = preconditions {
        if let Some(rv) = pre.get("resourceVersion").and_then(Value::as_str)
            && Some(rv) != meta_str(current, "resourceVersion")
        {
            return Err(ApiError::conflict_message(
                &rt.group,
                &rt.plural,
                &key.name,
                format!(
                    "Operation cannot be fulfilled on {} \"{}\": Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    rt.plural,
                    key.name,
                    meta_str(current, "resourceVersion").unwrap_or("")
                ),
            ));
        }
        if let Some(uid) = pre.get("uid").and_then(Value::as_str)
            && Some(uid) != meta_str(current, "uid")
        {
            return Err(ApiError::conflict_message(
                &rt.group,
                &rt.plural,
                &key.name,
                format!(
                    "Operation cannot be fulfilled on {} \"{}\": Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    rt.plural,
                    key.name,
                    meta_str(current, "uid").unwrap_or("")
                ),
            ));
        }
    }
    let now = state.clock.now_rfc3339();
    if !finalizers(current).is_empty() {
        if meta_str(current, "deletionTimestamp").is_some() {
            return Ok(current.clone());
        }
        let mut next = current.clone();
        let generation = next
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        set_meta(&mut next, "deletionTimestamp", json!(now));
        set_meta(&mut next, "deletionGracePeriodSeconds", json!(0));
        set_meta(&mut next, "generation", json!(generation + 1));
        return Ok(state.commit(key.clone(), next));
    }
    let removed = remove_with_dependents(state, key, &now);
    if rt.group == "apiextensions.k8s.io" && rt.plural == "customresourcedefinitions" {
        unregister_crd(state, &removed);
    }
    Ok(removed.unwrap_or(Value::Null))
}

fn remove_with_dependents(state: &mut State, key: &ObjectKey, now: &str) -> Option<Value> {
    let mut obj = state.get(key).cloned()?;
    set_meta(&mut obj, "deletionTimestamp", json!(now));
    state.objects.insert(key.clone(), obj);
    let removed = state.remove(key)?;
    let uid = meta_str(&removed, "uid").unwrap_or("").to_string();
    let dependents: Vec<ObjectKey> = state
        .objects
        .iter()
        .filter(|(_, v)| {
            v.pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .is_some_and(|refs| {
                    refs.iter()
                        .any(|r| r.get("uid").and_then(Value::as_str) == Some(uid.as_str()))
                })
        })
        .map(|(k, _)| k.clone())
        .collect();
    for d in dependents {
        remove_with_dependents(state, &d, now);
    }
    Some(removed)
}

fn after_write(state: &mut State, rt: &ResourceType, key: &ObjectKey, stored: &Value) {
    if rt.group.is_empty() && rt.plural == "pods" {
        kubelet::schedule_start(state, key, stored);
    }
    if rt.group == "apiextensions.k8s.io" && rt.plural == "customresourcedefinitions" {
        register_crd(state, key, stored);
    }
}

fn register_crd(state: &mut State, key: &ObjectKey, crd: &Value) {
    let Ok(types) = crd_types(crd) else {
        return;
    };
    if let Some(first) = types.first() {
        let (group, plural) = (first.group.clone(), first.plural.clone());
        state.registry.remove_custom(&group, &plural);
    }
    for t in &types {
        state.registry.insert(t.clone());
    }
    let names = crd.pointer("/spec/names").cloned().unwrap_or(Value::Null);
    let stored_versions: Vec<Value> = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .map(|vs| {
            vs.iter()
                .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                .filter_map(|v| v.get("name").cloned())
                .collect()
        })
        .unwrap_or_default();
    let now = state.clock.now_rfc3339();
    let status = json!({
        "acceptedNames": names,
        "storedVersions": stored_versions,
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
             "message": "no conflicts found", "lastTransitionTime": now},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
             "message": "the initial names have been accepted", "lastTransitionTime": now},
        ],
    });
    if crd.get("status") == Some(&status) {
        return;
    }
    let mut next = crd.clone();
    if let Some(m) = next.as_object_mut() {
        m.insert("status".to_string(), status);
    }
    state.commit(key.clone(), next);
}

fn unregister_crd(state: &mut State, crd: &Option<Value>) {
    let Some(crd) = crd else {
        return;
    };
    let (Some(group), Some(plural)) = (
        crd.pointer("/spec/group").and_then(Value::as_str),
        crd.pointer("/spec/names/plural").and_then(Value::as_str),
    ) else {
        return;
    };
    let (group, plural) = (group.to_string(), plural.to_string());
    state.registry.remove_custom(&group, &plural);
    let keys: Vec<ObjectKey> = state
        .objects
        .keys()
        .filter(|k| k.group == group && k.plural == plural)
        .cloned()
        .collect();
    for k in keys {
        state.remove(&k);
    }
}

/// Fills defaults and rejects what the real API server would reject (422).
fn default_and_validate(
    state: &State,
    rt: &ResourceType,
    name: &str,
    obj: &mut Value,
    old: Option<&Value>,
) -> Result<(), ApiError> {
    let invalid = |msg: String| ApiError::invalid(&rt.group, &rt.kind, name, msg);
    if let Some(labels) = obj.pointer("/metadata/labels") {
        let ok = labels.as_object().is_some_and(|m| {
            m.values()
                .all(|v| v.as_str().is_some_and(|s| s.len() <= 63))
        });
        if !ok {
            return Err(invalid(
                "metadata.labels: Invalid value: label values must be strings of at most 63 characters".to_string(),
            ));
        }
    }
    if let Some(ann) = obj.pointer("/metadata/annotations")
        && !ann
            .as_object()
            .is_some_and(|m| m.values().all(Value::is_string))
    {
        return Err(invalid(
            "metadata.annotations: Invalid value: annotation values must be strings".to_string(),
        ));
    }
    if rt.custom {
        if let Some(schema) = &rt.schema {
            schema::prune_and_validate(obj, schema).map_err(invalid)?;
        }
        return Ok(());
    }
    match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "pods") => validate_pod(obj, old).map_err(invalid),
        ("apps", "deployments" | "replicasets" | "statefulsets") => {
            validate_workload(obj).map_err(invalid)
        }
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            crd_types(obj).map_err(invalid)?;
            if old.is_none() {
                let group = obj
                    .pointer("/spec/group")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let plural = obj
                    .pointer("/spec/names/plural")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if state
                    .registry
                    .any_version(group, plural)
                    .is_some_and(|t| !t.custom)
                {
                    return Err(invalid(format!(
                        "spec.names.plural: Invalid value: \"{plural}\": is a built-in resource"
                    )));
                }
            }
            Ok(())
        }
        ("coordination.k8s.io", "leases") => {
            if let Some(d) = obj.pointer("/spec/leaseDurationSeconds")
                && d.as_i64().is_none_or(|d| d <= 0)
            {
                return Err(invalid(format!(
                    "spec.leaseDurationSeconds: Invalid value: {d}: must be greater than 0"
                )));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn validate_pod(pod: &Value, old: Option<&Value>) -> Result<(), String> {
    if let Some(cost) = pod
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(DELETION_COST))
        .and_then(Value::as_str)
        && cost.trim().parse::<i32>().is_err()
    {
        return Err(format!(
            "metadata.annotations[{DELETION_COST}]: Invalid value: \"{cost}\": must be a 32bit integer"
        ));
    }
    let containers = pod.pointer("/spec/containers").and_then(Value::as_array);
    if containers.is_none_or(Vec::is_empty) {
        return Err("spec.containers: Required value".to_string());
    }
    if let Some(old) = old {
        let mutable_view = |p: &Value| -> Value {
            let mut spec = p.get("spec").cloned().unwrap_or(Value::Null);
            if let Some(m) = spec.as_object_mut() {
                m.remove("activeDeadlineSeconds");
                m.remove("tolerations");
                if let Some(cs) = m.get_mut("containers").and_then(Value::as_array_mut) {
                    for c in cs {
                        if let Some(cm) = c.as_object_mut() {
                            cm.remove("image");
                        }
                    }
                }
            }
            spec
        };
        if mutable_view(pod) != mutable_view(old) {
            return Err(
                "spec: Forbidden: pod updates may not change fields other than `spec.containers[*].image`, `spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations` (only additions to existing tolerations)"
                    .to_string(),
            );
        }
    }
    Ok(())
}

fn validate_workload(obj: &mut Value) -> Result<(), String> {
    let spec = obj
        .get_mut("spec")
        .and_then(Value::as_object_mut)
        .ok_or("spec: Required value")?;
    match spec.get("replicas") {
        None | Some(Value::Null) => {
            spec.insert("replicas".to_string(), json!(1));
        }
        Some(r) => {
            if r.as_i64().is_none_or(|r| r < 0 || r > i64::from(i32::MAX)) {
                return Err(format!(
                    "spec.replicas: Invalid value: {r}: must be greater than or equal to 0"
                ));
            }
        }
    }
    let selector = spec
        .get("selector")
        .ok_or("spec.selector: Required value")?;
    let selector =
        LabelSelector::from_object(selector).map_err(|e| format!("spec.selector.{e}"))?;
    if selector.is_empty() {
        return Err(
            "spec.selector: Invalid value: empty selector is invalid for deployment".to_string(),
        );
    }
    let template_labels = crate::selector::labels_of(spec.get("template").unwrap_or(&Value::Null));
    if !selector.matches(&template_labels) {
        return Err("spec.template.metadata.labels: Invalid value: `selector` does not match template `labels`".to_string());
    }
    let containers = spec
        .get("template")
        .and_then(|t| t.pointer("/spec/containers"))
        .and_then(Value::as_array);
    if containers.is_none_or(Vec::is_empty) {
        return Err("spec.template.spec.containers: Required value".to_string());
    }
    Ok(())
}
