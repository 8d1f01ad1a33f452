//! The object store: every object as JSON keyed by (group, resource,
//! namespace, name), one global resourceVersion counter, a bounded history
//! of changes for watches, and the request log and injected faults.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};

use crate::fault::{Fault, RequestRecord};
use crate::resource::Registry;

/// Where an object lives.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ObjectKey {
    pub group: String,
    pub plural: String,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub(crate) fn new(group: &str, plural: &str, namespace: &str, name: &str) -> Self {
        Self {
            group: group.to_string(),
            plural: plural.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

/// The type of a change, as a watch event names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One recorded change, kept in the bounded history watches read from.
#[derive(Debug)]
pub(crate) struct Change {
    pub rv: u64,
    pub key: ObjectKey,
    pub change: ChangeType,
    pub object: Value,
    pub old: Option<Value>,
}

/// Wall time that follows tokio's clock, so paused-time tests see
/// timestamps move with `tokio::time::advance`.
#[derive(Debug, Clone)]
pub(crate) struct Clock {
    wall_base: DateTime<Utc>,
    start: tokio::time::Instant,
}

impl Clock {
    pub(crate) fn new(wall_base: DateTime<Utc>) -> Self {
        Self {
            wall_base,
            start: tokio::time::Instant::now(),
        }
    }

    pub(crate) fn now(&self) -> DateTime<Utc> {
        let elapsed = tokio::time::Instant::now().saturating_duration_since(self.start);
        self.wall_base + chrono::Duration::from_std(elapsed).unwrap_or_default()
    }

    /// `metav1.Time`: RFC 3339, seconds.
    pub(crate) fn now_rfc3339(&self) -> String {
        self.now().to_rfc3339_opts(SecondsFormat::Secs, true)
    }
}

/// The kubelet and scheduler knobs a test may change while running.
#[derive(Debug, Clone)]
pub(crate) struct SimSettings {
    pub kubelet: bool,
    pub pod_start_delay: Duration,
    pub nodes: Vec<String>,
    pub next_node: usize,
}

/// Everything behind the one lock.
#[derive(Debug)]
pub(crate) struct State {
    pub rv: u64,
    pub objects: BTreeMap<ObjectKey, Value>,
    pub history: VecDeque<Arc<Change>>,
    pub history_limit: usize,
    /// The newest resourceVersion no longer in the history: watches from
    /// older versions get 410 Gone.
    pub compacted_rv: u64,
    pub registry: Registry,
    pub log: Vec<RequestRecord>,
    pub faults: Vec<Fault>,
    pub sim: SimSettings,
    pub clock: Clock,
    /// Creation order by uid, the victim order's last tie-break.
    pub created_seq: HashMap<String, u64>,
    /// Pods created since the last drain, whose kubelet start is due after the delay.
    pub pending_starts: Vec<(ObjectKey, String, Duration)>,
    rng: u64,
}

impl State {
    pub(crate) fn new(
        registry: Registry,
        history_limit: usize,
        sim: SimSettings,
        clock: Clock,
        seed: u64,
    ) -> Self {
        Self {
            rv: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            compacted_rv: 0,
            registry,
            log: Vec::new(),
            faults: Vec::new(),
            sim,
            clock,
            created_seq: HashMap::new(),
            pending_starts: Vec::new(),
            rng: seed ^ 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// splitmix64: deterministic per seed, good enough for names and uids.
    pub(crate) fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A random name suffix from the alphabet Kubernetes uses (no vowels, no look-alikes).
    pub(crate) fn name_suffix(&mut self, len: usize) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        (0..len)
            .map(|_| {
                let i = (self.next_random() % ALPHABET.len() as u64) as usize;
                char::from(ALPHABET[i])
            })
            .collect()
    }

    /// A version-4-shaped UUID.
    pub(crate) fn uid(&mut self) -> String {
        let a = self.next_random();
        let b = self.next_random();
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0x0fff,
            0x8000 | ((b >> 48) & 0x3fff),
            b & 0xffff_ffff_ffff
        )
    }

    pub(crate) fn get(&self, key: &ObjectKey) -> Option<&Value> {
        self.objects.get(key)
    }

    /// Objects of (group, plural), in one namespace or all (`None`), sorted by namespace and name.
    pub(crate) fn list(
        &self,
        group: &str,
        plural: &str,
        namespace: Option<&str>,
    ) -> Vec<(ObjectKey, Value)> {
        self.objects
            .iter()
            .filter(|(k, _)| {
                k.group == group
                    && k.plural == plural
                    && namespace.is_none_or(|ns| k.namespace == ns)
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Stores a new or changed object under a fresh resourceVersion and records the change.
    pub(crate) fn commit(&mut self, key: ObjectKey, mut object: Value) -> Value {
        self.rv += 1;
        set_meta(
            &mut object,
            "resourceVersion",
            Value::String(self.rv.to_string()),
        );
        let old = self.objects.insert(key.clone(), object.clone());
        let change = if old.is_some() {
            ChangeType::Modified
        } else {
            if let Some(uid) = meta_str(&object, "uid") {
                self.created_seq.insert(uid.to_string(), self.rv);
            }
            ChangeType::Added
        };
        self.record(key, change, object.clone(), old);
        object
    }

    /// Removes an object, recording a DELETED change under a fresh resourceVersion.
    pub(crate) fn remove(&mut self, key: &ObjectKey) -> Option<Value> {
        let mut old = self.objects.remove(key)?;
        self.rv += 1;
        if let Some(uid) = meta_str(&old, "uid") {
            let uid = uid.to_string();
            self.created_seq.remove(&uid);
        }
        let previous = old.clone();
        set_meta(
            &mut old,
            "resourceVersion",
            Value::String(self.rv.to_string()),
        );
        self.record(
            key.clone(),
            ChangeType::Deleted,
            old.clone(),
            Some(previous),
        );
        Some(old)
    }

    fn record(&mut self, key: ObjectKey, change: ChangeType, object: Value, old: Option<Value>) {
        self.history.push_back(Arc::new(Change {
            rv: self.rv,
            key,
            change,
            object,
            old,
        }));
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted_rv = dropped.rv;
            }
        }
    }

    /// Forgets the whole change history, as etcd compaction with a cold
    /// watch cache does: every resourceVersion handed out so far becomes too
    /// old, so open watches get an ERROR 410 and watches from them are refused.
    pub(crate) fn compact(&mut self) {
        self.rv += 1;
        self.history.clear();
        self.compacted_rv = self.rv;
    }
}

/// The state plus the signals tasks wait on.
#[derive(Debug)]
pub(crate) struct Shared {
    state: Mutex<State>,
    /// The newest resourceVersion, sent after every change.
    pub changed: tokio::sync::watch::Sender<u64>,
    /// Set once when the server stops.
    pub shutdown: tokio::sync::watch::Sender<bool>,
    pub bookmark_interval: Duration,
    /// Issued tokens and access grants (TokenReview, SubjectAccessReview).
    pub auth: Mutex<crate::auth::AuthState>,
}

impl Shared {
    pub(crate) fn new(state: State, bookmark_interval: Duration, seed: u64) -> Arc<Self> {
        let rv = state.rv;
        Arc::new(Self {
            state: Mutex::new(state),
            changed: tokio::sync::watch::channel(rv).0,
            shutdown: tokio::sync::watch::channel(false).0,
            bookmark_interval,
            auth: Mutex::new(crate::auth::AuthState::new(seed)),
        })
    }

    /// Locks the issued tokens and grants.
    pub(crate) fn auth(&self) -> MutexGuard<'_, crate::auth::AuthState> {
        self.auth
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Locks the state for reading or for a change that needs no follow-up.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs a change, then the controllers, then wakes watches and starts
    /// kubelet timers for new pods. The lock is released before any await.
    pub(crate) fn mutate<R>(self: &Arc<Self>, f: impl FnOnce(&mut State) -> R) -> R {
        let (out, rv, starts) = {
            let mut state = self.lock();
            let before = state.rv;
            let out = f(&mut state);
            if state.rv != before {
                crate::workload::reconcile(&mut state);
            }
            let starts = std::mem::take(&mut state.pending_starts);
            (out, state.rv, starts)
        };
        self.finish(rv, starts);
        out
    }

    fn finish(self: &Arc<Self>, rv: u64, starts: Vec<(ObjectKey, String, Duration)>) {
        self.changed.send_replace(rv);
        for (key, uid, delay) in starts {
            let shared = Arc::clone(self);
            let mut shutdown = self.shutdown.subscribe();
            tokio::spawn(async move {
                tokio::select! {
                    () = tokio::time::sleep(delay) => shared.start_pod(&key, &uid),
                    () = stopped(&mut shutdown) => {}
                }
            });
        }
    }

    fn start_pod(self: &Arc<Self>, key: &ObjectKey, uid: &str) {
        let (rv, starts) = {
            let mut state = self.lock();
            let before = state.rv;
            crate::kubelet::start_pod(&mut state, key, uid);
            if state.rv != before {
                crate::workload::reconcile(&mut state);
            }
            (state.rv, std::mem::take(&mut state.pending_starts))
        };
        self.finish(rv, starts);
    }
}

/// Resolves once the server is stopping.
pub(crate) async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stopped| *stopped).await;
}

/// `metadata.<field>` as a string.
pub(crate) fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

/// Sets `metadata.<field>`, creating `metadata` if needed.
pub(crate) fn set_meta(obj: &mut Value, field: &str, value: Value) {
    if !obj.is_object() {
        *obj = Value::Object(Map::new());
    }
    if let Value::Object(top) = obj {
        let meta = top
            .entry("metadata".to_string())
            .or_insert_with(|| json!({}));
        if !meta.is_object() {
            *meta = json!({});
        }
        if let Value::Object(m) = meta {
            m.insert(field.to_string(), value);
        }
    }
}
