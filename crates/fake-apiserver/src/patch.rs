//! Patch semantics: strategic merge (with the patch merge keys of the fields
//! gpuscale touches) and a subset of server-side apply with field ownership
//! kept in `metadata.managedFields` (FieldsV1).

use std::collections::BTreeSet;

use serde_json::{Map, Value};

/// How a list field merges in a strategic-merge patch or an apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListStrategy {
    /// Items are objects merged by this key (`patchMergeKey`).
    MergeByKey(&'static str),
    /// A set of scalars (`patchStrategy:"merge"` on a primitive list): union.
    MergePrimitive,
    /// The whole list is replaced (atomic).
    Replace,
}

/// The merge strategy of a list field, from the Kubernetes Go types'
/// `patchStrategy`/`patchMergeKey` tags. `path` holds field names only (list
/// items add nothing). Custom resources have atomic lists apart from metadata.
pub(crate) fn list_strategy(kind: &str, custom: bool, path: &[String]) -> ListStrategy {
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    match p.as_slice() {
        ["metadata", "ownerReferences"] => return ListStrategy::MergeByKey("uid"),
        ["metadata", "finalizers"] => return ListStrategy::MergePrimitive,
        _ => {}
    }
    if custom {
        return ListStrategy::Replace;
    }
    match (kind, p.as_slice()) {
        (_, ["status", "conditions"]) => return ListStrategy::MergeByKey("type"),
        ("Node", ["status", "addresses"]) => return ListStrategy::MergeByKey("type"),
        ("Service", ["spec", "ports"]) => return ListStrategy::MergeByKey("port"),
        _ => {}
    }
    let pod_spec: &[&str] = match (kind, p.as_slice()) {
        ("Pod", ["spec", rest @ ..]) => rest,
        (
            "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet" | "Job",
            ["spec", "template", "spec", rest @ ..],
        ) => rest,
        _ => return ListStrategy::Replace,
    };
    match pod_spec {
        [
            "containers"
            | "initContainers"
            | "ephemeralContainers"
            | "volumes"
            | "imagePullSecrets",
        ] => ListStrategy::MergeByKey("name"),
        ["hostAliases"] => ListStrategy::MergeByKey("ip"),
        [
            "containers" | "initContainers" | "ephemeralContainers",
            "env",
        ] => ListStrategy::MergeByKey("name"),
        [
            "containers" | "initContainers" | "ephemeralContainers",
            "ports",
        ] => ListStrategy::MergeByKey("containerPort"),
        [
            "containers" | "initContainers" | "ephemeralContainers",
            "volumeMounts",
        ] => ListStrategy::MergeByKey("mountPath"),
        [
            "containers" | "initContainers" | "ephemeralContainers",
            "volumeDevices",
        ] => ListStrategy::MergeByKey("devicePath"),
        _ => ListStrategy::Replace,
    }
}

/// Applies a strategic-merge patch to `target` in place.
///
/// Supports maps (merge; `null` deletes), lists by their strategy, and the
/// directives `$patch: replace|delete|merge`, `$deleteFromPrimitiveList/<f>`;
/// `$setElementOrder/<f>` and `$retainKeys` are accepted and ignored.
pub(crate) fn strategic_merge(
    kind: &str,
    custom: bool,
    target: &mut Value,
    patch: &Value,
) -> Result<(), String> {
    let Value::Object(patch_map) = patch else {
        return Err("strategic merge patch must be a JSON object".to_string());
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target_map) = target else {
        return Err("invariant: target is an object".to_string());
    };
    let mut path = Vec::new();
    merge_map(kind, custom, &mut path, target_map, patch_map)
}

fn directive(v: &Value) -> Option<&str> {
    v.get("$patch").and_then(Value::as_str)
}

fn merge_map(
    kind: &str,
    custom: bool,
    path: &mut Vec<String>,
    target: &mut Map<String, Value>,
    patch: &Map<String, Value>,
) -> Result<(), String> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            target.clear();
            let mut stripped = Map::new();
            merge_map(kind, custom, path, &mut stripped, &without_directive(patch))?;
            *target = stripped;
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => {
            return Err(format!(
                "unknown patch type \"{other}\" in $patch directive at {}",
                path.join(".")
            ));
        }
    }
    for (k, v) in patch {
        if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Value::Array(remove)) = (target.get_mut(field), v) {
                list.retain(|item| !remove.contains(item));
            }
            continue;
        }
        path.push(k.clone());
        match v {
            Value::Null => {
                target.remove(k);
            }
            Value::Object(pm) => {
                if directive(v) == Some("delete") {
                    target.remove(k);
                } else {
                    let entry = target
                        .entry(k.clone())
                        .or_insert_with(|| Value::Object(Map::new()));
                    if !entry.is_object() {
                        *entry = Value::Object(Map::new());
                    }
                    if let Value::Object(tm) = entry {
                        merge_map(kind, custom, path, tm, pm)?;
                    }
                }
            }
            Value::Array(items) => {
                let strategy = list_strategy(kind, custom, path);
                let current = target.remove(k);
                let merged = merge_list(kind, custom, path, strategy, current, items)?;
                target.insert(k.clone(), merged);
            }
            scalar => {
                target.insert(k.clone(), scalar.clone());
            }
        }
        path.pop();
    }
    Ok(())
}

fn without_directive(m: &Map<String, Value>) -> Map<String, Value> {
    let mut out = m.clone();
    out.remove("$patch");
    out
}

fn merge_list(
    kind: &str,
    custom: bool,
    path: &mut Vec<String>,
    strategy: ListStrategy,
    current: Option<Value>,
    items: &[Value],
) -> Result<Value, String> {
    let replace_all = items.iter().any(|i| directive(i) == Some("replace"));
    let mut out: Vec<Value> = match current {
        Some(Value::Array(a)) if !replace_all => a,
        _ => Vec::new(),
    };
    match strategy {
        ListStrategy::Replace => {
            let mut fresh = Vec::new();
            for item in items {
                fresh.push(strip(kind, custom, path, item)?);
            }
            Ok(Value::Array(fresh))
        }
        ListStrategy::MergePrimitive => {
            for item in items {
                if directive(item).is_some() {
                    continue;
                }
                if !out.contains(item) {
                    out.push(item.clone());
                }
            }
            Ok(Value::Array(out))
        }
        ListStrategy::MergeByKey(key) => {
            for item in items {
                let Value::Object(im) = item else {
                    if !out.contains(item) {
                        out.push(item.clone());
                    }
                    continue;
                };
                if directive(item) == Some("replace") {
                    continue;
                }
                let Some(kv) = im.get(key) else {
                    return Err(format!(
                        "map: {:?} does not contain declared merge key: {key}",
                        im
                    ));
                };
                let pos = out.iter().position(|e| e.get(key) == Some(kv));
                if directive(item) == Some("delete") {
                    out.retain(|e| e.get(key) != Some(kv));
                    continue;
                }
                match pos {
                    Some(i) => {
                        if let Value::Object(existing) = &mut out[i] {
                            merge_map(kind, custom, path, existing, im)?;
                        }
                    }
                    None => {
                        let mut fresh = Map::new();
                        merge_map(kind, custom, path, &mut fresh, im)?;
                        out.push(Value::Object(fresh));
                    }
                }
            }
            Ok(Value::Array(out))
        }
    }
}

/// A value with directives processed against nothing (as if newly added).
fn strip(kind: &str, custom: bool, path: &mut Vec<String>, v: &Value) -> Result<Value, String> {
    match v {
        Value::Object(m) => {
            let mut fresh = Map::new();
            merge_map(kind, custom, path, &mut fresh, m)?;
            Ok(Value::Object(fresh))
        }
        other => Ok(other.clone()),
    }
}

/// One step of a field path as server-side apply tracks it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum PathElem {
    /// A field of an object (`f:<name>` in FieldsV1).
    Field(String),
    /// A list item by its merge key, as compact JSON (`k:<json>` in FieldsV1).
    Key(String),
}

pub(crate) type FieldPath = Vec<PathElem>;

const SERVER_OWNED_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
    "generateName",
];

/// The leaf field paths an applied configuration sets.
pub(crate) fn leaf_paths(
    kind: &str,
    custom: bool,
    config: &Value,
    status_only: bool,
) -> BTreeSet<FieldPath> {
    let mut out = BTreeSet::new();
    let Value::Object(top) = config else {
        return out;
    };
    for (k, v) in top {
        if k == "apiVersion" || k == "kind" {
            continue;
        }
        if (k == "status") != status_only {
            continue;
        }
        let mut names = vec![k.clone()];
        let mut path = vec![PathElem::Field(k.clone())];
        if k == "metadata" {
            if let Value::Object(meta) = v {
                for (mk, mv) in meta {
                    if SERVER_OWNED_METADATA.contains(&mk.as_str()) {
                        continue;
                    }
                    names.push(mk.clone());
                    path.push(PathElem::Field(mk.clone()));
                    collect(kind, custom, mv, &mut names, &mut path, &mut out);
                    names.pop();
                    path.pop();
                }
            }
            continue;
        }
        collect(kind, custom, v, &mut names, &mut path, &mut out);
    }
    out
}

fn collect(
    kind: &str,
    custom: bool,
    v: &Value,
    names: &mut Vec<String>,
    path: &mut FieldPath,
    out: &mut BTreeSet<FieldPath>,
) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                names.push(k.clone());
                path.push(PathElem::Field(k.clone()));
                collect(kind, custom, child, names, path, out);
                names.pop();
                path.pop();
            }
        }
        Value::Array(items) => match list_strategy(kind, custom, names) {
            ListStrategy::MergeByKey(key) if items.iter().all(|i| i.get(key).is_some()) => {
                for item in items {
                    let mut key_map = Map::new();
                    if let Some(kv) = item.get(key) {
                        key_map.insert(key.to_string(), kv.clone());
                    }
                    path.push(PathElem::Key(Value::Object(key_map).to_string()));
                    collect(kind, custom, item, names, path, out);
                    path.pop();
                }
            }
            _ => {
                out.insert(path.clone());
            }
        },
        _ => {
            out.insert(path.clone());
        }
    }
}

/// Encodes a set of paths as a FieldsV1 tree.
pub(crate) fn to_fields_v1(paths: &BTreeSet<FieldPath>) -> Value {
    let mut root = Map::new();
    for p in paths {
        let mut cur = &mut root;
        for elem in p {
            let (name, is_key) = match elem {
                PathElem::Field(f) => (format!("f:{f}"), false),
                PathElem::Key(k) => (format!("k:{k}"), true),
            };
            let entry = cur.entry(name).or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            let Value::Object(next) = entry else {
                break;
            };
            if is_key {
                next.entry(".".to_string())
                    .or_insert_with(|| Value::Object(Map::new()));
            }
            cur = next;
        }
    }
    Value::Object(root)
}

/// Decodes a FieldsV1 tree into its leaf paths.
pub(crate) fn from_fields_v1(tree: &Value) -> BTreeSet<FieldPath> {
    let mut out = BTreeSet::new();
    let mut path = Vec::new();
    walk_fields(tree, &mut path, &mut out);
    out
}

fn walk_fields(tree: &Value, path: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
    let Value::Object(m) = tree else {
        return;
    };
    let children: Vec<_> = m.iter().filter(|(k, _)| k.as_str() != ".").collect();
    if children.is_empty() {
        if !path.is_empty() {
            out.insert(path.clone());
        }
        return;
    }
    for (k, child) in children {
        let elem = if let Some(f) = k.strip_prefix("f:") {
            PathElem::Field(f.to_string())
        } else if let Some(key) = k.strip_prefix("k:") {
            PathElem::Key(key.to_string())
        } else {
            continue;
        };
        path.push(elem);
        walk_fields(child, path, out);
        path.pop();
    }
}

/// Renders a path the way apply conflicts name it: `.spec.replicas`.
pub(crate) fn render_path(p: &FieldPath) -> String {
    let mut s = String::new();
    for e in p {
        match e {
            PathElem::Field(f) => {
                s.push('.');
                s.push_str(f);
            }
            PathElem::Key(k) => {
                s.push('[');
                s.push_str(k);
                s.push(']');
            }
        }
    }
    s
}

fn key_matches(item: &Value, key_json: &str) -> bool {
    let Ok(Value::Object(key)) = serde_json::from_str::<Value>(key_json) else {
        return false;
    };
    key.iter().all(|(k, v)| item.get(k) == Some(v))
}

/// The value at a path, if present.
pub(crate) fn get_at<'a>(obj: &'a Value, path: &[PathElem]) -> Option<&'a Value> {
    let mut cur = obj;
    for e in path {
        cur = match e {
            PathElem::Field(f) => cur.get(f)?,
            PathElem::Key(k) => cur.as_array()?.iter().find(|i| key_matches(i, k))?,
        };
    }
    Some(cur)
}

/// Removes the value at a path, if present.
pub(crate) fn remove_at(obj: &mut Value, path: &[PathElem]) {
    let Some((last, parent_path)) = path.split_last() else {
        return;
    };
    let mut cur = obj;
    for e in parent_path {
        let next = match e {
            PathElem::Field(f) => cur.get_mut(f),
            PathElem::Key(k) => cur
                .as_array_mut()
                .and_then(|a| a.iter_mut().find(|i| key_matches(i, k))),
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    match last {
        PathElem::Field(f) => {
            if let Value::Object(m) = cur {
                m.remove(f);
            }
        }
        PathElem::Key(k) => {
            if let Value::Array(a) = cur {
                a.retain(|i| !key_matches(i, k));
            }
        }
    }
}

/// One field manager's entry in `metadata.managedFields`.
#[derive(Debug, Clone)]
pub(crate) struct ManagerEntry {
    pub manager: String,
    pub operation: String,
    pub subresource: String,
    pub fields: BTreeSet<FieldPath>,
    pub raw: Value,
}

pub(crate) fn read_managers(obj: &Value) -> Vec<ManagerEntry> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .map(|entries| {
            entries
                .iter()
                .map(|e| ManagerEntry {
                    manager: e
                        .get("manager")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    operation: e
                        .get("operation")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    subresource: e
                        .get("subresource")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    fields: e.get("fieldsV1").map(from_fields_v1).unwrap_or_default(),
                    raw: e.clone(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A field owned by another manager whose value the apply would change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApplyConflict {
    pub manager: String,
    pub path: String,
}

/// What an apply needs besides the objects.
#[derive(Debug, Clone)]
pub(crate) struct ApplyRequest<'a> {
    pub kind: &'a str,
    pub custom: bool,
    pub manager: &'a str,
    pub force: bool,
    pub status_only: bool,
    pub api_version: &'a str,
    pub now: &'a str,
}

/// Server-side apply: merges `config` into `current` (or a new object),
/// detects conflicts with other appliers' fields, removes fields this
/// manager applied before but no longer does, and records ownership.
pub(crate) fn server_side_apply(
    req: &ApplyRequest<'_>,
    current: Option<&Value>,
    config: &Value,
) -> Result<Value, Vec<ApplyConflict>> {
    let mut object = current
        .cloned()
        .unwrap_or_else(|| Value::Object(Map::new()));
    let mut managers = read_managers(&object);
    let new_set = leaf_paths(req.kind, req.custom, config, req.status_only);
    let subresource = if req.status_only { "status" } else { "" };

    let mut conflicts = Vec::new();
    for m in managers.iter_mut() {
        if m.manager == req.manager && m.operation == "Apply" && m.subresource == subresource {
            continue;
        }
        let shared: Vec<FieldPath> = m.fields.intersection(&new_set).cloned().collect();
        for p in shared {
            let differs = get_at(&object, &p) != get_at(config, &p);
            if differs {
                if req.force {
                    m.fields.remove(&p);
                } else {
                    conflicts.push(ApplyConflict {
                        manager: m.manager.clone(),
                        path: render_path(&p),
                    });
                }
            }
        }
    }
    if !conflicts.is_empty() {
        return Err(conflicts);
    }

    let old_set = managers
        .iter()
        .find(|m| {
            m.manager == req.manager && m.operation == "Apply" && m.subresource == subresource
        })
        .map(|m| m.fields.clone())
        .unwrap_or_default();
    let mut remaining: BTreeSet<FieldPath> = new_set.clone();
    for m in &managers {
        if !(m.manager == req.manager && m.operation == "Apply" && m.subresource == subresource) {
            remaining.extend(m.fields.iter().cloned());
        }
    }
    for gone in old_set.difference(&remaining) {
        // Remove the whole list item when nobody keeps any field of it.
        let mut target: &[PathElem] = gone;
        for (i, e) in gone.iter().enumerate() {
            if let PathElem::Key(_) = e {
                let prefix = &gone[..=i];
                if !remaining.iter().any(|r| r.starts_with(prefix)) {
                    target = prefix;
                    break;
                }
            }
        }
        remove_at(&mut object, target);
    }

    let mut applied = config.clone();
    if let Value::Object(m) = &mut applied {
        if let Some(Value::Object(meta)) = m.get_mut("metadata") {
            meta.remove("managedFields");
            meta.remove("resourceVersion");
        }
        if !req.status_only {
            m.remove("status");
        }
    }
    if let Err(e) = strategic_merge(req.kind, req.custom, &mut object, &applied) {
        return Err(vec![ApplyConflict {
            manager: req.manager.to_string(),
            path: e,
        }]);
    }

    let mut entries: Vec<Value> = Vec::new();
    let mut wrote_own = false;
    for m in managers {
        let own =
            m.manager == req.manager && m.operation == "Apply" && m.subresource == subresource;
        if own {
            wrote_own = true;
            entries.push(manager_entry(req, subresource, &new_set));
            continue;
        }
        if m.fields.is_empty() {
            continue;
        }
        let mut raw = m.raw.clone();
        if let Value::Object(r) = &mut raw {
            r.insert("fieldsV1".to_string(), to_fields_v1(&m.fields));
        }
        entries.push(raw);
    }
    if !wrote_own {
        entries.push(manager_entry(req, subresource, &new_set));
    }
    if let Value::Object(top) = &mut object {
        let meta = top
            .entry("metadata".to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(meta) = meta {
            meta.insert("managedFields".to_string(), Value::Array(entries));
        }
    }
    Ok(object)
}

fn manager_entry(req: &ApplyRequest<'_>, subresource: &str, fields: &BTreeSet<FieldPath>) -> Value {
    let mut e = serde_json::json!({
        "manager": req.manager,
        "operation": "Apply",
        "apiVersion": req.api_version,
        "time": req.now,
        "fieldsType": "FieldsV1",
        "fieldsV1": to_fields_v1(fields),
    });
    if !subresource.is_empty()
        && let Value::Object(m) = &mut e
    {
        m.insert(
            "subresource".to_string(),
            Value::String(subresource.to_string()),
        );
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn conditions_merge_by_type_and_keep_others() {
        let mut pod = json!({"status": {"conditions": [
            {"type": "Ready", "status": "False"},
            {"type": "PodScheduled", "status": "True"}
        ]}});
        strategic_merge(
            "Pod",
            false,
            &mut pod,
            &json!({"status": {"conditions": [{"type": "gpuscale.dev/engine-warm", "status": "True"}]}}),
        )
        .unwrap();
        let types: Vec<&str> = pod["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            types,
            vec!["Ready", "PodScheduled", "gpuscale.dev/engine-warm"]
        );
    }

    #[test]
    fn delete_directive_removes_a_keyed_item() {
        let mut d = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "a", "image": "x"}, {"name": "b", "image": "y"}
        ]}}}});
        strategic_merge(
            "Deployment",
            false,
            &mut d,
            &json!({"spec": {"template": {"spec": {"containers": [
                {"name": "a", "$patch": "delete"}, {"name": "b", "image": "z"}
            ]}}}}),
        )
        .unwrap();
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"],
            json!([{"name": "b", "image": "z"}])
        );
    }

    #[test]
    fn fields_v1_round_trips() {
        let config = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"a": "b"}},
            "spec": {"containers": [{"name": "c", "image": "i"}]}});
        let paths = leaf_paths("Pod", false, &config, false);
        assert_eq!(from_fields_v1(&to_fields_v1(&paths)), paths);
        assert!(paths.contains(&vec![
            PathElem::Field("spec".into()),
            PathElem::Field("containers".into()),
            PathElem::Key(r#"{"name":"c"}"#.into()),
            PathElem::Field("image".into()),
        ]));
    }
}
