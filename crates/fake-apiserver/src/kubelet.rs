//! A scheduler and kubelet simulation: pods are assigned to the configured
//! nodes round-robin, go Pending → Running after the start delay, and get the
//! kubelet's conditions, with `Ready` computed by the kubelet's rule: all
//! containers ready and every readiness gate's condition `"True"`.

use serde_json::{Map, Value, json};

use crate::store::{ObjectKey, State, meta_str};

/// The pod's phase, `Pending` when unset.
pub(crate) fn phase(pod: &Value) -> &str {
    pod.pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("Pending")
}

pub(crate) fn node_name(pod: &Value) -> &str {
    pod.pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// The status of the pod condition of this type, if present.
pub(crate) fn condition<'a>(pod: &'a Value, type_: &str) -> Option<&'a Value> {
    pod.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(type_))
}

pub(crate) fn condition_true(pod: &Value, type_: &str) -> bool {
    condition(pod, type_)
        .and_then(|c| c.get("status"))
        .and_then(Value::as_str)
        == Some("True")
}

pub(crate) fn is_ready(pod: &Value) -> bool {
    condition_true(pod, "Ready")
}

/// Called on a pod about to be created: assigns a node and sets the initial status.
pub(crate) fn prepare_new_pod(state: &mut State, pod: &mut Value) {
    if node_name(pod).is_empty() && state.sim.kubelet && !state.sim.nodes.is_empty() {
        let node = state.sim.nodes[state.sim.next_node % state.sim.nodes.len()].clone();
        state.sim.next_node = state.sim.next_node.wrapping_add(1);
        if let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) {
            spec.insert("nodeName".to_string(), Value::String(node));
        }
    }
    let now = state.clock.now_rfc3339();
    let assigned = !node_name(pod).is_empty();
    let mut status = Map::new();
    status.insert("phase".to_string(), json!("Pending"));
    status.insert("qosClass".to_string(), json!("BestEffort"));
    let scheduled = if assigned {
        json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": now})
    } else {
        json!({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
               "message": "0/0 nodes are available: no nodes registered with the fake scheduler.",
               "lastProbeTime": null, "lastTransitionTime": now})
    };
    status.insert("conditions".to_string(), json!([scheduled]));
    if assigned && state.sim.kubelet {
        status.insert("hostIP".to_string(), json!(host_ip(node_name(pod))));
        let containers: Vec<Value> = containers(pod)
            .iter()
            .map(|c| {
                json!({
                    "name": c.get("name").cloned().unwrap_or(Value::Null),
                    "image": c.get("image").cloned().unwrap_or(Value::Null),
                    "imageID": "",
                    "ready": false,
                    "started": false,
                    "restartCount": 0,
                    "state": {"waiting": {"reason": "ContainerCreating"}},
                })
            })
            .collect();
        status.insert("containerStatuses".to_string(), Value::Array(containers));
    }
    if let Value::Object(top) = pod {
        top.insert("status".to_string(), Value::Object(status));
    }
    refresh_conditions(pod, &now);
}

/// Queues the kubelet start of a just-created pod, if the kubelet runs for it.
pub(crate) fn schedule_start(state: &mut State, key: &ObjectKey, pod: &Value) {
    if state.sim.kubelet
        && !node_name(pod).is_empty()
        && phase(pod) == "Pending"
        && let Some(uid) = meta_str(pod, "uid")
    {
        {
            state
                .pending_starts
                .push((key.clone(), uid.to_string(), state.sim.pod_start_delay));
        }
    }
}

fn containers(pod: &Value) -> Vec<Value> {
    pod.pointer("/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn host_ip(node: &str) -> String {
    let h = node
        .bytes()
        .fold(7u32, |a, b| a.wrapping_mul(31).wrapping_add(u32::from(b)));
    format!(
        "10.{}.{}.{}",
        100 + h % 100,
        (h >> 8) % 250,
        1 + (h >> 16) % 250
    )
}

/// Registers a Node object for each scheduler node that has none (Ready, with a GPU capacity).
pub(crate) fn register_nodes(state: &mut State) {
    let now = state.clock.now_rfc3339();
    for name in state.sim.nodes.clone() {
        let key = ObjectKey::new("", "nodes", "", &name);
        if state.get(&key).is_some() {
            continue;
        }
        let uid = state.uid();
        let node = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "uid": uid, "creationTimestamp": now, "generation": 1,
                         "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
            "spec": {},
            "status": {
                "capacity": {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": "8"},
                "allocatable": {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": "8"},
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                "message": "kubelet is posting ready status",
                                "lastHeartbeatTime": now, "lastTransitionTime": now}],
                "addresses": [{"type": "InternalIP", "address": host_ip(&name)},
                              {"type": "Hostname", "address": name}],
            },
        });
        state.commit(key, node);
    }
}

/// The start delay has passed: the containers run and report ready.
pub(crate) fn start_pod(state: &mut State, key: &ObjectKey, uid: &str) {
    let Some(mut pod) = state.get(key).cloned() else {
        return;
    };
    if meta_str(&pod, "uid") != Some(uid) || phase(&pod) != "Pending" || node_name(&pod).is_empty()
    {
        return;
    }
    let now = state.clock.now_rfc3339();
    let seq = state.next_random();
    let pod_ip = format!("10.244.{}.{}", (seq >> 8) % 250, 1 + seq % 250);
    let statuses: Vec<Value> = containers(&pod)
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({
                "name": c.get("name").cloned().unwrap_or(Value::Null),
                "image": c.get("image").cloned().unwrap_or(Value::Null),
                "imageID": format!("fake://{}", c.get("image").and_then(Value::as_str).unwrap_or("")),
                "containerID": format!("containerd://{:016x}{:02}", seq, i),
                "ready": true,
                "started": true,
                "restartCount": 0,
                "state": {"running": {"startedAt": now}},
            })
        })
        .collect();
    if let Some(status) = pod.get_mut("status").and_then(Value::as_object_mut) {
        status.insert("phase".to_string(), json!("Running"));
        status.insert("startTime".to_string(), json!(now));
        status.insert("podIP".to_string(), json!(pod_ip));
        status.insert("podIPs".to_string(), json!([{"ip": pod_ip}]));
        status.insert("containerStatuses".to_string(), Value::Array(statuses));
    }
    refresh_conditions(&mut pod, &now);
    state.commit(key.clone(), pod);
}

/// Sets every container's `ready` (a test's way to make an engine fail or recover).
pub(crate) fn set_containers_ready(pod: &mut Value, ready: bool, now: &str) {
    if let Some(list) = pod
        .pointer_mut("/status/containerStatuses")
        .and_then(Value::as_array_mut)
    {
        for c in list {
            if let Some(m) = c.as_object_mut() {
                m.insert("ready".to_string(), json!(ready));
            }
        }
    }
    refresh_conditions(pod, now);
}

fn upsert_condition(
    conditions: &mut Vec<Value>,
    type_: &str,
    status: bool,
    reason: Option<&str>,
    now: &str,
) {
    let status_str = if status { "True" } else { "False" };
    let existing = conditions
        .iter_mut()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(type_));
    match existing {
        Some(c) => {
            let changed = c.get("status").and_then(Value::as_str) != Some(status_str);
            if let Some(m) = c.as_object_mut() {
                m.insert("status".to_string(), json!(status_str));
                if changed {
                    m.insert("lastTransitionTime".to_string(), json!(now));
                }
                match reason {
                    Some(r) => {
                        m.insert("reason".to_string(), json!(r));
                    }
                    None => {
                        m.remove("reason");
                        m.remove("message");
                    }
                }
            }
        }
        None => {
            let mut c = json!({"type": type_, "status": status_str, "lastProbeTime": null, "lastTransitionTime": now});
            if let (Some(r), Some(m)) = (reason, c.as_object_mut()) {
                m.insert("reason".to_string(), json!(r));
            }
            conditions.push(c);
        }
    }
}

/// Recomputes the kubelet-owned conditions (`Initialized`, `ContainersReady`,
/// `Ready`) of an assigned pod. Other conditions (readiness gates, set by
/// controllers through `pods/status`) are left as they are.
pub(crate) fn refresh_conditions(pod: &mut Value, now: &str) {
    if node_name(pod).is_empty() {
        return;
    }
    let running = phase(pod) == "Running";
    let statuses = pod
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let n_containers = containers(pod).len();
    let containers_ready = running
        && statuses.len() == n_containers
        && statuses
            .iter()
            .all(|c| c.get("ready").and_then(Value::as_bool) == Some(true));
    let gates: Vec<String> = pod
        .pointer("/spec/readinessGates")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|g| g.get("conditionType").and_then(Value::as_str))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let missing_gates: Vec<&String> = gates.iter().filter(|g| !condition_true(pod, g)).collect();
    let ready = containers_ready && missing_gates.is_empty();
    let ready_reason = if !containers_ready {
        Some("ContainersNotReady")
    } else if !missing_gates.is_empty() {
        Some("ReadinessGatesNotReady")
    } else {
        None
    };
    let Some(status) = pod.get_mut("status").and_then(Value::as_object_mut) else {
        return;
    };
    let conditions = status
        .entry("conditions".to_string())
        .or_insert_with(|| json!([]));
    if !conditions.is_array() {
        *conditions = json!([]);
    }
    let Some(list) = conditions.as_array_mut() else {
        return;
    };
    upsert_condition(list, "Initialized", true, None, now);
    upsert_condition(
        list,
        "ContainersReady",
        containers_ready,
        (!containers_ready).then_some("ContainersNotReady"),
        now,
    );
    upsert_condition(list, "Ready", ready, ready_reason, now);
}
