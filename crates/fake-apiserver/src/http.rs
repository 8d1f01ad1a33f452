//! HTTP: routing of Kubernetes API paths, the verbs, subresources, watch
//! streams, discovery, the request log and injected faults.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::ApiError;
use crate::fault::{FaultKind, RequestRecord, Verb};
use crate::patch::{ApplyRequest, server_side_apply, strategic_merge};
use crate::resource::{Registry, ResourceType, get_dotted, set_dotted};
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{ChangeType, ObjectKey, Shared, State, meta_str};
use crate::write::{self, Part};

pub(crate) type Body = BoxBody<Bytes, Infallible>;

const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

/// Where a request goes.
#[derive(Debug, Clone)]
enum Route {
    Version,
    CoreVersions,
    GroupList,
    Group(String),
    GroupVersion(String, String),
    Resource(Box<ResourcePath>),
    NotFound,
}

#[derive(Debug, Clone)]
struct ResourcePath {
    group: String,
    version: String,
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
    rt: Option<ResourceType>,
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

fn parse_route(registry: &Registry, path: &str) -> Route {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => return Route::Version,
        ["api"] => return Route::CoreVersions,
        ["apis"] => return Route::GroupList,
        ["apis", g] => return Route::Group((*g).to_string()),
        ["api", v] => return Route::GroupVersion(String::new(), (*v).to_string()),
        ["apis", g, v] => return Route::GroupVersion((*g).to_string(), (*v).to_string()),
        ["api", v, rest @ ..] => (String::new(), (*v).to_string(), rest),
        ["apis", g, v, rest @ ..] => ((*g).to_string(), (*v).to_string(), rest),
        _ => return Route::NotFound,
    };
    let namespaced_form = rest.len() >= 3
        && rest[0] == "namespaces"
        && registry
            .get(&group, &version, rest[2])
            .is_some_and(|t| t.namespaced);
    let (namespace, tail) = if namespaced_form {
        (Some(rest[1].to_string()), &rest[2..])
    } else {
        (None, rest)
    };
    if tail.is_empty() || tail.len() > 3 {
        return Route::NotFound;
    }
    let plural = tail[0].to_string();
    let rt = registry.get(&group, &version, &plural).cloned();
    if let Some(t) = &rt
        && !t.namespaced
        && namespace.is_some()
    {
        return Route::NotFound;
    }
    Route::Resource(Box::new(ResourcePath {
        group,
        version,
        plural,
        namespace,
        name: tail.get(1).map(|s| (*s).to_string()),
        sub: tail.get(2).map(|s| (*s).to_string()),
        rt,
    }))
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    let mut resp = Response::new(full(serde_json::to_vec(v).unwrap_or_default()));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(
        StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &e.to_status(),
    )
}

fn verb_of(method: &Method, route: &Route, query: &HashMap<String, String>) -> Option<Verb> {
    let (has_name, has_sub) = match route {
        Route::Resource(r) => (r.name.is_some(), r.sub.is_some()),
        _ => (true, false),
    };
    Some(match *method {
        Method::GET if !has_name => {
            if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
                Verb::Watch
            } else {
                Verb::List
            }
        }
        Method::GET => Verb::Get,
        Method::POST => Verb::Create,
        Method::PUT => Verb::Update,
        Method::PATCH => Verb::Patch,
        Method::DELETE if has_name || has_sub => Verb::Delete,
        Method::DELETE => Verb::DeleteCollection,
        _ => return None,
    })
}

/// One request, start to end.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = parse_query(req.uri().query().unwrap_or(""));
    let headers = req.headers().clone();
    let route = parse_route(&shared.lock().registry, &path);
    let Some(verb) = verb_of(&method, &route, &query) else {
        return Ok(error_response(&ApiError::method_not_allowed(format!(
            "the server does not allow the method {method} on {path}"
        ))));
    };
    let mut record = RequestRecord {
        verb,
        method: method.to_string(),
        path: path.clone(),
        group: String::new(),
        version: String::new(),
        resource: String::new(),
        subresource: None,
        namespace: None,
        name: None,
        patch_type: (method == Method::PATCH)
            .then(|| content_type(&headers))
            .filter(|c| !c.is_empty()),
        field_manager: query.get("fieldManager").cloned(),
        status: 0,
    };
    if let Route::Resource(r) = &route {
        record.group = r.group.clone();
        record.version = r.version.clone();
        record.resource = r.plural.clone();
        record.subresource = r.sub.clone();
        record.namespace = r.namespace.clone();
        record.name = r.name.clone();
    }

    let fault = {
        let mut state = shared.lock();
        take_fault(&mut state, &record)
    };
    match fault {
        Some(FaultKind::Status(code)) | Some(FaultKind::StatusRetryAfter(code, _)) => {
            let mut resp = error_response(&ApiError::injected(code));
            if let Some(FaultKind::StatusRetryAfter(_, secs)) = fault
                && let Ok(v) = header::HeaderValue::from_str(&secs.to_string())
            {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            record.status = code;
            shared.lock().log.push(record);
            return Ok(resp);
        }
        Some(FaultKind::Hang) => {
            shared.lock().log.push(record);
            let mut shutdown = shared.shutdown.subscribe();
            crate::store::stopped(&mut shutdown).await;
            return Ok(error_response(&ApiError::injected(503)));
        }
        Some(FaultKind::Delay(d)) => tokio::time::sleep(d).await,
        None => {}
    }

    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let resp = error_response(&ApiError::bad_request(format!(
                "reading the request body: {e}"
            )));
            record.status = 400;
            shared.lock().log.push(record);
            return Ok(resp);
        }
    };
    let resp = dispatch(&shared, &route, verb, &query, &headers, &body);
    record.status = resp.status().as_u16();
    shared.lock().log.push(record);
    Ok(resp)
}

fn take_fault(state: &mut State, record: &RequestRecord) -> Option<FaultKind> {
    let idx = state.faults.iter().position(|f| f.matches(record))?;
    let fault = &mut state.faults[idx];
    let kind = fault.kind;
    fault.times = fault.times.saturating_sub(1);
    if fault.times == 0 {
        state.faults.remove(idx);
    }
    Some(kind)
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

fn wants_metadata_only(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"))
}

fn dispatch(
    shared: &Arc<Shared>,
    route: &Route,
    verb: Verb,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response<Body> {
    let result = match route {
        Route::Version => Ok((StatusCode::OK, version_info())),
        Route::CoreVersions => Ok((
            StatusCode::OK,
            json!({"kind": "APIVersions", "versions": ["v1"],
                   "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
        )),
        Route::GroupList => Ok((StatusCode::OK, group_list(&shared.lock().registry))),
        Route::Group(g) => {
            let list = group_list(&shared.lock().registry);
            list["groups"]
                .as_array()
                .and_then(|gs| gs.iter().find(|x| x["name"] == g.as_str()).cloned())
                .map(|mut grp| {
                    if let Some(m) = grp.as_object_mut() {
                        m.insert("kind".to_string(), json!("APIGroup"));
                        m.insert("apiVersion".to_string(), json!("v1"));
                    }
                    (StatusCode::OK, grp)
                })
                .ok_or_else(|| ApiError::path_not_found(&format!("/apis/{g}")))
        }
        Route::GroupVersion(g, v) => resource_list(&shared.lock().registry, g, v),
        Route::Resource(r) => {
            return resource_request(shared, r, verb, query, headers, body);
        }
        Route::NotFound => Err(ApiError::path_not_found("unknown path")),
    };
    match result {
        Ok((code, v)) if verb == Verb::Get => json_response(code, &v),
        Ok(_) => error_response(&ApiError::method_not_allowed(
            "only GET is allowed on discovery paths",
        )),
        Err(e) => error_response(&e),
    }
}

fn version_info() -> Value {
    json!({
        "major": "1", "minor": "33", "gitVersion": "v1.33.0-fake", "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean", "buildDate": "2025-04-23T00:00:00Z", "goVersion": "go1.24.2",
        "compiler": "gc", "platform": "linux/amd64",
    })
}

fn group_list(registry: &Registry) -> Value {
    let groups: Vec<Value> = registry
        .groups()
        .into_iter()
        .map(|(name, versions)| {
            let vs: Vec<Value> = versions
                .iter()
                .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
                .collect();
            let preferred = vs.first().cloned().unwrap_or(Value::Null);
            json!({"name": name, "versions": vs, "preferredVersion": preferred})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(
    registry: &Registry,
    group: &str,
    version: &str,
) -> Result<(StatusCode, Value), ApiError> {
    let resources: Vec<Value> = registry
        .all()
        .filter(|t| t.group == group && t.version == version)
        .flat_map(ResourceType::discovery_entries)
        .collect();
    if resources.is_empty() {
        return Err(ApiError::path_not_found(&format!("{group}/{version}")));
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Ok((
        StatusCode::OK,
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    ))
}

/// Shapes an object for the response: the requested apiVersion, or metadata only.
fn present(obj: &Value, rt: &ResourceType, meta_only: bool) -> Value {
    if meta_only {
        return json!({
            "apiVersion": "meta.k8s.io/v1",
            "kind": "PartialObjectMetadata",
            "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
        });
    }
    let mut out = obj.clone();
    if let Some(m) = out.as_object_mut() {
        m.insert("apiVersion".to_string(), json!(rt.api_version()));
        m.insert("kind".to_string(), json!(rt.kind));
    }
    out
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

fn dry_run(query: &HashMap<String, String>) -> bool {
    query.get("dryRun").is_some_and(|v| v == "All")
}

fn resource_request(
    shared: &Arc<Shared>,
    r: &ResourcePath,
    verb: Verb,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response<Body> {
    let Some(rt) = r.rt.clone() else {
        return error_response(&ApiError::path_not_found(&format!(
            "{}/{}, resource {}",
            r.group, r.version, r.plural
        )));
    };
    if rt.is_review() {
        return review(shared, &rt, verb, body);
    }
    let meta_only = wants_metadata_only(headers);
    let ns = r.namespace.clone().unwrap_or_default();
    if let Some(sub) = &r.sub {
        let known = (sub == "status" && rt.status_subresource)
            || (sub == "scale" && rt.scale.is_some())
            || (sub == "eviction" && rt.group.is_empty() && rt.plural == "pods");
        if !known {
            return error_response(&ApiError::path_not_found(&format!("{}/{}", rt.plural, sub)));
        }
    }
    let result: Result<(StatusCode, Value), ApiError> = match verb {
        Verb::Get => {
            let state = shared.lock();
            let name = r.name.clone().unwrap_or_default();
            let key = ObjectKey::new(&rt.group, &rt.plural, &ns, &name);
            match state.get(&key) {
                None => Err(ApiError::not_found(&rt.group, &rt.plural, &name)),
                Some(obj) if r.sub.as_deref() == Some("scale") => {
                    scale_view(&rt, obj).map(|s| (StatusCode::OK, s))
                }
                Some(obj) => Ok((StatusCode::OK, present(obj, &rt, meta_only))),
            }
        }
        Verb::List => list(
            &shared.lock(),
            &rt,
            r.namespace.as_deref(),
            query,
            meta_only,
        ),
        Verb::Watch => return watch(shared, &rt, r.namespace.clone(), query, meta_only),
        Verb::Create => {
            if r.sub.as_deref() == Some("eviction") {
                evict(shared, &rt, &ns, r.name.as_deref().unwrap_or(""))
            } else if r.name.is_some() {
                Err(ApiError::method_not_allowed(format!(
                    "POST is not allowed on a named {}",
                    rt.plural
                )))
            } else if rt.namespaced && r.namespace.is_none() {
                Err(ApiError::method_not_allowed(format!(
                    "POST on the cluster-wide collection of the namespaced resource {} is not allowed",
                    rt.plural
                )))
            } else {
                parse_body(body).and_then(|obj| {
                    shared
                        .mutate(|s| write::create(s, &rt, &ns, obj, dry_run(query)))
                        .map(|o| (StatusCode::CREATED, present(&o, &rt, meta_only)))
                })
            }
        }
        Verb::Update => {
            let name = r.name.clone().unwrap_or_default();
            let key = ObjectKey::new(&rt.group, &rt.plural, &ns, &name);
            parse_body(body).and_then(|obj| match r.sub.as_deref() {
                Some("scale") => shared.mutate(|s| scale_write(s, &rt, &key, &obj, dry_run(query))),
                sub => {
                    let part = if sub == Some("status") {
                        Part::Status
                    } else {
                        Part::Main
                    };
                    shared
                        .mutate(|s| write::replace(s, &rt, &key, obj, part, dry_run(query)))
                        .map(|o| (StatusCode::OK, present(&o, &rt, meta_only)))
                }
            })
        }
        Verb::Patch => {
            let name = r.name.clone().unwrap_or_default();
            let key = ObjectKey::new(&rt.group, &rt.plural, &ns, &name);
            let ct = content_type(headers);
            shared.mutate(|s| patch(s, &rt, &key, r.sub.as_deref(), &ct, body, query, meta_only))
        }
        Verb::Delete => {
            let name = r.name.clone().unwrap_or_default();
            let key = ObjectKey::new(&rt.group, &rt.plural, &ns, &name);
            let options: Option<Value> = serde_json::from_slice(body).ok();
            let pre = options
                .as_ref()
                .and_then(|o| o.get("preconditions"))
                .cloned();
            if dry_run(query) {
                let state = shared.lock();
                state
                    .get(&key)
                    .map(|o| (StatusCode::OK, present(o, &rt, meta_only)))
                    .ok_or_else(|| ApiError::not_found(&rt.group, &rt.plural, &name))
            } else {
                shared
                    .mutate(|s| write::delete(s, &rt, &key, pre.as_ref()))
                    .map(|o| (StatusCode::OK, present(&o, &rt, meta_only)))
            }
        }
        Verb::DeleteCollection => delete_collection(shared, &rt, r.namespace.as_deref(), query),
    };
    match result {
        Ok((code, v)) => json_response(code, &v),
        Err(e) => error_response(&e),
    }
}

/// DELETE on a collection: every object the list selects, deleted.
fn delete_collection(
    shared: &Arc<Shared>,
    rt: &ResourceType,
    namespace: Option<&str>,
    query: &HashMap<String, String>,
) -> Result<(StatusCode, Value), ApiError> {
    let listed = list(&shared.lock(), rt, namespace, query, false);
    listed.map(|(_, l)| {
        let names: Vec<(String, String)> = l["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .map(|i| {
                        (
                            meta_str(i, "namespace").unwrap_or("").to_string(),
                            meta_str(i, "name").unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let deleted: Vec<Value> = shared.mutate(|s| {
            names
                .iter()
                .filter_map(|(n_ns, n)| {
                    let key = ObjectKey::new(&rt.group, &rt.plural, n_ns, n);
                    write::delete(s, rt, &key, None).ok()
                })
                .map(|o| present(&o, rt, false))
                .collect()
        });
        (
            StatusCode::OK,
            json!({"apiVersion": rt.api_version(), "kind": format!("{}List", rt.kind),
                   "metadata": {}, "items": deleted}),
        )
    })
}

/// A TokenReview or SubjectAccessReview: create only, answered, not stored.
fn review(shared: &Arc<Shared>, rt: &ResourceType, verb: Verb, body: &Bytes) -> Response<Body> {
    if verb != Verb::Create {
        return error_response(&ApiError::method_not_allowed(format!(
            "{} can only be created",
            rt.plural
        )));
    }
    let result = parse_body(body).and_then(|obj| {
        let answered = if rt.plural == "tokenreviews" {
            let now = shared.lock().clock.now().timestamp();
            shared.auth().token_review(&obj, now)
        } else {
            shared.auth().access_review(&obj)
        };
        answered.map(|mut out| {
            if let Some(m) = out.as_object_mut() {
                m.insert("apiVersion".to_string(), json!(rt.api_version()));
                m.insert("kind".to_string(), json!(rt.kind));
            }
            out
        })
    });
    match result {
        Ok(v) => json_response(StatusCode::CREATED, &v),
        Err(e) => error_response(&e),
    }
}

fn evict(
    shared: &Arc<Shared>,
    rt: &ResourceType,
    ns: &str,
    name: &str,
) -> Result<(StatusCode, Value), ApiError> {
    let key = ObjectKey::new(&rt.group, &rt.plural, ns, name);
    shared.mutate(|s| write::delete(s, rt, &key, None))?;
    Ok((
        StatusCode::CREATED,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
    ))
}

fn list(
    state: &State,
    rt: &ResourceType,
    namespace: Option<&str>,
    query: &HashMap<String, String>,
    meta_only: bool,
) -> Result<(StatusCode, Value), ApiError> {
    let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
        .map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))
        .map_err(ApiError::bad_request)?;
    let limit: Option<usize> = match query.get("limit").filter(|l| !l.is_empty()) {
        Some(l) => Some(l.parse::<usize>().map_err(|_| {
            ApiError::bad_request(format!(
                "limit: Invalid value: \"{l}\": must be a non-negative integer"
            ))
        })?),
        None => None,
    }
    .filter(|l| *l > 0);
    let after: Option<(String, String)> =
        query
            .get("continue")
            .filter(|c| !c.is_empty())
            .and_then(|c| {
                c.split_once('/')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            });
    let mut items: Vec<(ObjectKey, Value)> = state
        .list(&rt.group, &rt.plural, namespace)
        .into_iter()
        .filter(|(_, v)| labels.matches_object(v) && fields.matches(v))
        .filter(|(k, _)| {
            after.as_ref().is_none_or(|(ans, aname)| {
                (k.namespace.as_str(), k.name.as_str()) > (ans.as_str(), aname.as_str())
            })
        })
        .collect();
    let mut meta = json!({"resourceVersion": state.rv.to_string()});
    if let Some(limit) = limit
        && items.len() > limit
    {
        let remaining = items.len() - limit;
        items.truncate(limit);
        if let (Some((last, _)), Some(m)) = (items.last(), meta.as_object_mut()) {
            m.insert(
                "continue".to_string(),
                json!(format!("{}/{}", last.namespace, last.name)),
            );
            m.insert("remainingItemCount".to_string(), json!(remaining));
        }
    }
    let items: Vec<Value> = items
        .iter()
        .map(|(_, v)| present(v, rt, meta_only))
        .collect();
    let (api_version, kind) = if meta_only {
        (
            "meta.k8s.io/v1".to_string(),
            "PartialObjectMetadataList".to_string(),
        )
    } else {
        (rt.api_version(), format!("{}List", rt.kind))
    };
    Ok((
        StatusCode::OK,
        json!({"apiVersion": api_version, "kind": kind, "metadata": meta, "items": items}),
    ))
}

/// The `autoscaling/v1` Scale of an object with a scale subresource.
fn scale_view(rt: &ResourceType, obj: &Value) -> Result<Value, ApiError> {
    let Some(paths) = &rt.scale else {
        return Err(ApiError::path_not_found(&format!("{}/scale", rt.plural)));
    };
    let spec_replicas = get_dotted(obj, &paths.spec_replicas)
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let status_replicas = get_dotted(obj, &paths.status_replicas)
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let selector = if rt.custom {
        paths
            .label_selector
            .as_ref()
            .and_then(|p| get_dotted(obj, p))
            .and_then(Value::as_str)
            .map(str::to_string)
    } else {
        obj.pointer("/spec/selector")
            .and_then(|s| LabelSelector::from_object(s).ok())
            .map(|s| s.render())
    };
    let meta = obj.get("metadata").cloned().unwrap_or(json!({}));
    let mut status = json!({"replicas": status_replicas});
    if let (Some(sel), Some(m)) = (selector, status.as_object_mut()) {
        m.insert("selector".to_string(), json!(sel));
    }
    Ok(json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
            "creationTimestamp": meta.get("creationTimestamp"),
        },
        "spec": {"replicas": spec_replicas},
        "status": status,
    }))
}

/// Writes a Scale back to its object: checks the resourceVersion, validates replicas.
fn scale_write(
    state: &mut State,
    rt: &ResourceType,
    key: &ObjectKey,
    scale: &Value,
    dry_run: bool,
) -> Result<(StatusCode, Value), ApiError> {
    let Some(paths) = rt.scale.clone() else {
        return Err(ApiError::path_not_found(&format!("{}/scale", rt.plural)));
    };
    let Some(current) = state.get(key).cloned() else {
        return Err(ApiError::not_found(&rt.group, &rt.plural, &key.name));
    };
    if let Some(rv) = meta_str(scale, "resourceVersion")
        && !rv.is_empty()
        && Some(rv) != meta_str(&current, "resourceVersion")
    {
        return Err(ApiError::conflict(&rt.group, &rt.plural, &key.name));
    }
    let replicas = scale.pointer("/spec/replicas").cloned().unwrap_or(json!(0));
    let valid = replicas
        .as_i64()
        .filter(|n| *n >= 0 && *n <= i64::from(i32::MAX));
    let Some(n) = valid else {
        return Err(ApiError::invalid(
            "autoscaling",
            "Scale",
            &key.name,
            format!("spec.replicas: Invalid value: {replicas}: must be greater than or equal to 0"),
        ));
    };
    let mut next = current.clone();
    set_dotted(&mut next, &paths.spec_replicas, json!(n));
    if let Some(m) = next.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    let updated = write::replace(state, rt, key, next, Part::Main, dry_run)?;
    Ok((StatusCode::OK, scale_view(rt, &updated)?))
}

#[allow(clippy::too_many_arguments)]
fn patch(
    state: &mut State,
    rt: &ResourceType,
    key: &ObjectKey,
    sub: Option<&str>,
    content_type: &str,
    body: &Bytes,
    query: &HashMap<String, String>,
    meta_only: bool,
) -> Result<(StatusCode, Value), ApiError> {
    let current = state.get(key).cloned();
    let is_scale = sub == Some("scale");
    let part = if sub == Some("status") {
        Part::Status
    } else {
        Part::Main
    };
    if content_type == "application/apply-patch+yaml" {
        return apply(
            state, rt, key, current, part, is_scale, body, query, meta_only,
        );
    }
    let Some(current) = current else {
        return Err(ApiError::not_found(&rt.group, &rt.plural, &key.name));
    };
    let mut base = if is_scale {
        scale_view(rt, &current)?
    } else {
        current.clone()
    };
    let patch_doc = parse_body(body)?;
    match content_type {
        "application/merge-patch+json" => json_patch::merge(&mut base, &patch_doc),
        "application/json-patch+json" => {
            let ops: json_patch::Patch = serde_json::from_value(patch_doc)
                .map_err(|e| ApiError::bad_request(format!("the JSON patch is malformed: {e}")))?;
            json_patch_like_the_api_server(&mut base, ops).map_err(|e| {
                ApiError::invalid(
                    &rt.group,
                    &rt.kind,
                    &key.name,
                    format!("the JSON patch could not be applied: {e}"),
                )
            })?;
        }
        "application/strategic-merge-patch+json" => {
            if rt.custom && !is_scale {
                return Err(ApiError::unsupported_media_type(
                    "strategic merge patch is not supported for custom resources; use a JSON merge patch or server-side apply",
                ));
            }
            let kind = if is_scale { "Scale" } else { rt.kind.as_str() };
            strategic_merge(kind, false, &mut base, &patch_doc).map_err(ApiError::bad_request)?;
        }
        other => {
            return Err(ApiError::unsupported_media_type(format!(
                "the body of the request was in an unknown format ({other}) - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json"
            )));
        }
    }
    if is_scale {
        return scale_write(state, rt, key, &base, dry_run(query));
    }
    let stored = write::replace(state, rt, key, base, part, dry_run(query))?;
    Ok((StatusCode::OK, present(&stored, rt, meta_only)))
}

/// Applies a JSON patch as the API server does: a `test` of a path that
/// does not exist against `null` passes (the API server's JSON patch reads a
/// missing member as null; kube-rs's finalizer helper relies on it). All or
/// nothing: on an error `doc` is unchanged.
fn json_patch_like_the_api_server(
    doc: &mut Value,
    ops: json_patch::Patch,
) -> Result<(), json_patch::PatchError> {
    let mut work = doc.clone();
    for op in ops.0 {
        if let json_patch::PatchOperation::Test(t) = &op
            && t.value.is_null()
            && work.pointer(t.path.as_str()).is_none()
        {
            continue;
        }
        json_patch::patch(&mut work, std::slice::from_ref(&op))?;
    }
    *doc = work;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn apply(
    state: &mut State,
    rt: &ResourceType,
    key: &ObjectKey,
    current: Option<Value>,
    part: Part,
    is_scale: bool,
    body: &Bytes,
    query: &HashMap<String, String>,
    meta_only: bool,
) -> Result<(StatusCode, Value), ApiError> {
    let Some(manager) = query.get("fieldManager").filter(|m| !m.is_empty()) else {
        return Err(ApiError::bad_request(
            "PATCH request with application/apply-patch+yaml: fieldManager is required for apply requests",
        ));
    };
    let config: Value = serde_yaml::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the applied configuration is not valid YAML or JSON: {e}"
        ))
    })?;
    if is_scale {
        let Some(current) = current else {
            return Err(ApiError::not_found(&rt.group, &rt.plural, &key.name));
        };
        let mut base = scale_view(rt, &current)?;
        json_patch::merge(&mut base, &config);
        return scale_write(state, rt, key, &base, dry_run(query));
    }
    if config
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .is_empty()
        || config
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty()
    {
        return Err(ApiError::bad_request(
            "apiVersion and kind must be set in the applied configuration",
        ));
    }
    if let Some(name) = meta_str(&config, "name")
        && name != key.name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({name}) does not match the name on the URL ({})",
            key.name
        )));
    }
    let force = query.get("force").is_some_and(|f| f == "true");
    let now = state.clock.now_rfc3339();
    let api_version = rt.api_version();
    let req = ApplyRequest {
        kind: &rt.kind,
        custom: rt.custom,
        manager,
        force,
        status_only: part == Part::Status,
        api_version: &api_version,
        now: &now,
    };
    let merged = server_side_apply(&req, current.as_ref(), &config).map_err(|conflicts| {
        let lines: Vec<String> = conflicts
            .iter()
            .map(|c| format!("conflict with \"{}\": {}", c.manager, c.path))
            .collect();
        ApiError::conflict_message(
            &rt.group,
            &rt.plural,
            &key.name,
            format!(
                "Apply failed with {} conflict{}: {}",
                lines.len(),
                if lines.len() == 1 { "" } else { "s" },
                lines.join("; ")
            ),
        )
    })?;
    match current {
        None => {
            if part == Part::Status {
                return Err(ApiError::not_found(&rt.group, &rt.plural, &key.name));
            }
            let mut obj = merged;
            crate::store::set_meta(&mut obj, "name", json!(key.name));
            let stored = write::create(state, rt, &key.namespace, obj, dry_run(query))?;
            Ok((StatusCode::CREATED, present(&stored, rt, meta_only)))
        }
        Some(_) => {
            let stored = write::replace(state, rt, key, merged, part, dry_run(query))?;
            Ok((StatusCode::OK, present(&stored, rt, meta_only)))
        }
    }
}

/// What one watch asks for.
#[derive(Debug, Clone)]
struct WatchSpec {
    rt: ResourceType,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    meta_only: bool,
    bookmarks: bool,
    send_initial: bool,
    timeout: Option<Duration>,
    start_rv: Option<u64>,
}

fn watch(
    shared: &Arc<Shared>,
    rt: &ResourceType,
    namespace: Option<String>,
    query: &HashMap<String, String>,
    meta_only: bool,
) -> Response<Body> {
    let parsed = (|| -> Result<WatchSpec, ApiError> {
        let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
            .map_err(ApiError::bad_request)?;
        let fields = FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))
            .map_err(ApiError::bad_request)?;
        let start_rv = match query.get("resourceVersion").filter(|v| !v.is_empty()) {
            Some(v) => Some(v.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!(
                    "resourceVersion: Invalid value: \"{v}\": must be an integer"
                ))
            })?),
            None => None,
        };
        let timeout = match query.get("timeoutSeconds").filter(|v| !v.is_empty()) {
            Some(v) => Some(Duration::from_secs(v.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!(
                    "timeoutSeconds: Invalid value: \"{v}\": must be an integer"
                ))
            })?)),
            None => None,
        };
        Ok(WatchSpec {
            rt: rt.clone(),
            namespace,
            labels,
            fields,
            meta_only,
            bookmarks: query
                .get("allowWatchBookmarks")
                .is_some_and(|v| v == "true"),
            send_initial: query.get("sendInitialEvents").is_some_and(|v| v == "true"),
            timeout,
            start_rv,
        })
    })();
    let spec = match parsed {
        Ok(s) => s,
        Err(e) => return error_response(&e),
    };
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    tokio::spawn(run_watch(Arc::clone(shared), spec, tx));
    let stream = ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn event_line(type_: &str, object: &Value) -> Bytes {
    let mut line =
        serde_json::to_vec(&json!({"type": type_, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn bookmark(spec: &WatchSpec, rv: u64, initial_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end && let Some(m) = meta.as_object_mut() {
        m.insert(
            "annotations".to_string(),
            json!({INITIAL_EVENTS_END: "true"}),
        );
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": spec.rt.kind, "apiVersion": spec.rt.api_version(), "metadata": meta}),
    )
}

fn gone(rv: u64, oldest: u64) -> Bytes {
    event_line(
        "ERROR",
        &ApiError::gone(format!("too old resource version: {rv} ({oldest})")).to_status(),
    )
}

fn watch_matches(spec: &WatchSpec, obj: &Value) -> bool {
    spec.labels.matches_object(obj) && spec.fields.matches(obj)
}

fn in_scope(spec: &WatchSpec, key: &ObjectKey) -> bool {
    key.group == spec.rt.group
        && key.plural == spec.rt.plural
        && spec
            .namespace
            .as_ref()
            .is_none_or(|ns| *ns == key.namespace)
}

/// Collects the events after `last` for this watch, or `Err(oldest)` when
/// the history no longer reaches back that far.
fn collect_events(state: &State, spec: &WatchSpec, last: u64) -> Result<Vec<Bytes>, u64> {
    if last < state.compacted_rv {
        return Err(state.compacted_rv + 1);
    }
    let mut out = Vec::new();
    for change in state.history.iter().filter(|c| c.rv > last) {
        if !in_scope(spec, &change.key) {
            continue;
        }
        let now_matches = watch_matches(spec, &change.object);
        let was_matching = change.old.as_ref().is_some_and(|o| watch_matches(spec, o));
        let type_ = match change.change {
            ChangeType::Added if now_matches => "ADDED",
            ChangeType::Modified if was_matching && now_matches => "MODIFIED",
            ChangeType::Modified if now_matches => "ADDED",
            ChangeType::Modified if was_matching => "DELETED",
            ChangeType::Deleted if was_matching || now_matches => "DELETED",
            _ => continue,
        };
        out.push(event_line(
            type_,
            &present(&change.object, &spec.rt, spec.meta_only),
        ));
    }
    Ok(out)
}

async fn run_watch(shared: Arc<Shared>, spec: WatchSpec, tx: mpsc::Sender<Bytes>) {
    let mut changed = shared.changed.subscribe();
    let mut shutdown = shared.shutdown.subscribe();
    let deadline = spec.timeout.map(|t| tokio::time::Instant::now() + t);
    let (initial, mut last) = {
        let state = shared.lock();
        match spec.start_rv {
            Some(rv) if rv > 0 && !spec.send_initial => {
                if rv < state.compacted_rv {
                    (vec![gone(rv, state.compacted_rv + 1)], u64::MAX)
                } else {
                    (Vec::new(), rv)
                }
            }
            _ => {
                let mut events: Vec<Bytes> = state
                    .list(&spec.rt.group, &spec.rt.plural, spec.namespace.as_deref())
                    .iter()
                    .filter(|(_, v)| watch_matches(&spec, v))
                    .map(|(_, v)| event_line("ADDED", &present(v, &spec.rt, spec.meta_only)))
                    .collect();
                if spec.send_initial {
                    events.push(bookmark(&spec, state.rv, true));
                }
                (events, state.rv)
            }
        }
    };
    for line in initial {
        if tx.send(line).await.is_err() {
            return;
        }
    }
    if last == u64::MAX {
        return;
    }
    let bookmark_interval = shared.bookmark_interval;
    loop {
        changed.borrow_and_update();
        let batch = {
            let state = shared.lock();
            let batch = collect_events(&state, &spec, last);
            if batch.is_ok() {
                last = state.rv;
            }
            batch
        };
        match batch {
            Ok(lines) => {
                for line in lines {
                    if tx.send(line).await.is_err() {
                        return;
                    }
                }
            }
            Err(oldest) => {
                let _ = tx.send(gone(last, oldest)).await;
                return;
            }
        }
        let timeout = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            res = changed.changed() => {
                if res.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep(bookmark_interval), if spec.bookmarks => {
                if tx.send(bookmark(&spec, last, false)).await.is_err() {
                    return;
                }
            }
            () = timeout => return,
            () = crate::store::stopped(&mut shutdown) => return,
            () = tx.closed() => return,
        }
    }
}
