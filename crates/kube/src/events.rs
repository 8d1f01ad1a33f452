//! Kubernetes Events (`events.k8s.io/v1`) about InferenceAutoscalers.
//!
//! One Event per thing that happened (a scale action with its one-line
//! reason, a drain, an adopted manual edit, an invalid spec), created with
//! `generateName` and never patched: kube-runtime's recorder folds repeats
//! into a series and keeps the first note, which would lose the reasons.
//! The same reason and note for the same object within [`REPEAT_WINDOW`]
//! is sent once. Publishing is best effort: a failure is logged, never
//! returned, and never stops an action.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use gpuscale_scaler::Clock;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;
use tokio::time::Instant;

use crate::drain::one_line;

/// The `reportingController` of every Event.
pub(crate) const REPORTING_CONTROLLER: &str = "gpuscale.dev/scaler";
/// Identical Events for one object are not repeated within this window.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(300);

/// `Normal` or `Warning`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Normal,
    Warning,
}

/// One Event to publish.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EventSpec {
    pub type_: EventType,
    /// CamelCase, e.g. `ScaledUp`.
    pub reason: &'static str,
    /// CamelCase, e.g. `Scale`.
    pub action: &'static str,
    /// One line (at most 1 kB).
    pub note: String,
    /// A second object involved (the target, a pod).
    pub related: Option<ObjectReference>,
}

/// Creates Events through the API server.
pub(crate) struct EventPublisher {
    client: kube::Client,
    instance: String,
    field_manager: String,
    clock: Clock,
    recent: Mutex<HashMap<(String, &'static str, String), Instant>>,
}

impl std::fmt::Debug for EventPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventPublisher")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl EventPublisher {
    pub fn new(client: kube::Client, instance: &str, field_manager: &str, clock: Clock) -> Self {
        Self {
            client,
            instance: instance.to_string(),
            field_manager: field_manager.to_string(),
            clock,
            recent: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes `event` about `regarding` (best effort).
    pub async fn publish(&self, regarding: &ObjectReference, event: EventSpec) {
        let note = one_line(&event.note, 1000);
        let key = (
            regarding.uid.clone().unwrap_or_else(|| {
                format!(
                    "{}/{}",
                    regarding.namespace.as_deref().unwrap_or(""),
                    regarding.name.as_deref().unwrap_or("")
                )
            }),
            event.reason,
            note.clone(),
        );
        {
            let now = Instant::now();
            let mut recent = self
                .recent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            recent.retain(|_, at| now.saturating_duration_since(*at) < REPEAT_WINDOW);
            if recent.contains_key(&key) {
                return;
            }
            recent.insert(key, now);
        }
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = regarding.name.clone().unwrap_or_else(|| "gpuscale".into());
        let at = MicroTime(
            k8s_openapi::jiff::Timestamp::from_millisecond(self.clock.now().as_millis())
                .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        );
        let body = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{name}.")),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(at),
            reporting_controller: Some(REPORTING_CONTROLLER.into()),
            reporting_instance: Some(self.instance.clone()),
            action: Some(event.action.into()),
            reason: Some(event.reason.into()),
            note: Some(note.clone()),
            type_: Some(
                match event.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            regarding: Some(regarding.clone()),
            related: event.related,
            ..Event::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        let params = PostParams {
            field_manager: Some(self.field_manager.clone()),
            ..PostParams::default()
        };
        match api.create(&params, &body).await {
            Ok(_) => tracing::debug!(object = %name, reason = event.reason, %note, "event"),
            Err(e) => {
                tracing::warn!(object = %name, reason = event.reason, error = %e, "could not publish an event")
            }
        }
    }
}
