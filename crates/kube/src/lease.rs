//! Leader election over a `coordination.k8s.io/v1` Lease.
//!
//! Every scaler replica runs a [`LeaderElector`]; the one holding the lease
//! acts, the others are standbys (not ready, deciding nothing). The rules,
//! as client-go's leader election:
//!
//! * **Acquire**: create the lease if it does not exist; take it over when
//!   its record (holder, renew time, transitions) has not changed for its
//!   `leaseDurationSeconds`, measured on *this* replica's monotonic clock
//!   from when it first saw that record (never from the record's own
//!   timestamps: clocks of different nodes disagree). Every write carries
//!   the `resourceVersion` it read, so of two candidates only one wins (409
//!   for the other).
//! * **Renew** every `retry_period` while holding it.
//! * **Stop acting** as soon as no renew has succeeded within
//!   `renew_deadline`, measured with the monotonic clock from *before* the
//!   last successful renew was sent. Since `renew_deadline < lease_duration`
//!   and a standby waits `lease_duration` from when it saw that renew (which
//!   is after it was sent), the ex-leader has stopped before anyone can
//!   take over: no two replicas act at once. [`Leadership::may_write`] lets
//!   a write start only if it can finish (its timeout) before then.
//! * **Release** on graceful shutdown: stop acting, then clear the holder,
//!   so a standby takes over at its next attempt instead of after expiry.
//!
//! Defaults (client-go's): lease 15 s, renew deadline 10 s, retry 2 s.

use std::sync::Arc;
use std::time::Duration;

use gpuscale_scaler::Clock;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::{KubeError, api_status};

/// Leader-election settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Namespace of the Lease (the scaler's own).
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// client-go's timings: 15 s lease, 10 s renew deadline, 2 s retry.
    pub fn new(namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    /// Checks `retry_period < renew_deadline < lease_duration` and the names;
    /// the error names the flag, the value and what is allowed.
    pub fn validate(&self) -> Result<(), KubeError> {
        for (flag, value) in [
            ("--lease-namespace", &self.namespace),
            ("--lease-name", &self.name),
            ("--identity", &self.identity),
        ] {
            if value.is_empty() || value.len() > 253 {
                return Err(KubeError::config(
                    flag,
                    value.as_str(),
                    "1..=253 characters",
                ));
            }
        }
        if self.lease_duration < Duration::from_secs(1)
            || self.lease_duration > Duration::from_secs(3600)
        {
            return Err(KubeError::config(
                "--lease-duration",
                format!("{:?}", self.lease_duration),
                "1s..=1h",
            ));
        }
        if self.renew_deadline >= self.lease_duration || self.renew_deadline.is_zero() {
            return Err(KubeError::config(
                "--renew-deadline",
                format!("{:?}", self.renew_deadline),
                format!(
                    "more than 0 and less than --lease-duration ({:?}): the leader must stop acting before its lease can be taken",
                    self.lease_duration
                ),
            ));
        }
        if self.retry_period >= self.renew_deadline || self.retry_period.is_zero() {
            return Err(KubeError::config(
                "--retry-period",
                format!("{:?}", self.retry_period),
                format!(
                    "more than 0 and less than --renew-deadline ({:?})",
                    self.renew_deadline
                ),
            ));
        }
        Ok(())
    }

    /// Longest a leader's write may take: the margin between the renew
    /// deadline and the lease duration, so a write that starts while the
    /// leader may act lands before a standby can take over.
    pub fn write_budget(&self) -> Duration {
        self.lease_duration.saturating_sub(self.renew_deadline)
    }
}

/// Until when a leader may act after a renew that was sent at `renew_sent`.
pub(crate) fn acting_until(renew_sent: Instant, renew_deadline: Duration) -> Instant {
    renew_sent + renew_deadline
}

/// Whether a lease held by someone else, whose record was first seen at
/// `observed_at` and has not changed since, may be taken over at `now`.
pub fn expired(observed_at: Instant, lease_duration: Duration, now: Instant) -> bool {
    now >= observed_at + lease_duration
}

/// Whether this replica may act, shared by everything that acts.
#[derive(Debug, Clone)]
pub struct Leadership {
    inner: Arc<LeadershipInner>,
}

#[derive(Debug)]
struct LeadershipInner {
    /// `None`: not leading (or always leading when `always`).
    until: watch::Sender<Option<Instant>>,
    active: watch::Sender<bool>,
    always: bool,
}

impl Leadership {
    fn new(always: bool) -> Self {
        Self {
            inner: Arc::new(LeadershipInner {
                until: watch::channel(None).0,
                active: watch::channel(always).0,
                always,
            }),
        }
    }

    /// Leadership without election (`--leader-elect=false`): always acting.
    pub fn always() -> Self {
        Self::new(true)
    }

    /// Whether this replica may act now.
    pub fn is_leading(&self) -> bool {
        self.inner.always
            || self
                .inner
                .until
                .borrow()
                .is_some_and(|t| Instant::now() < t)
    }

    /// Whether a write may start now: only while leading. The caller bounds
    /// the write by [`LeaseConfig::write_budget`], so it lands before a
    /// standby could take over.
    pub fn may_write(&self) -> Result<(), KubeError> {
        if self.is_leading() {
            return Ok(());
        }
        match *self.inner.until.borrow() {
            Some(_) => Err(KubeError::NotLeader(
                "no lease renewal succeeded within the renew deadline".into(),
            )),
            None => Err(KubeError::NotLeader(
                "this replica does not hold the lease".into(),
            )),
        }
    }

    /// True while leading; changes when leadership is gained or lost.
    pub fn active(&self) -> watch::Receiver<bool> {
        self.inner.active.subscribe()
    }

    fn renewed(&self, until: Instant) {
        self.inner.until.send_replace(Some(until));
        if self
            .inner
            .active
            .send_if_modified(|a| !std::mem::replace(a, true))
        {
            tracing::info!("leading: this replica holds the lease and acts");
        }
    }

    fn stop(&self, why: &str) {
        if self.inner.always {
            return;
        }
        self.inner.until.send_replace(None);
        if self
            .inner
            .active
            .send_if_modified(|a| std::mem::replace(a, false))
        {
            tracing::warn!(why, "stopped leading: this replica no longer acts");
        }
    }

    /// Turns `active` false once the deadline passes without a renew.
    async fn watchdog(self) {
        let mut until = self.inner.until.subscribe();
        loop {
            let deadline = *until.borrow_and_update();
            if let Some(t) = deadline {
                tokio::select! {
                    _ = tokio::time::sleep_until(t) => {
                        if self.inner.active.send_if_modified(|a| std::mem::replace(a, false)) {
                            tracing::warn!("stopped leading: no lease renewal succeeded within the renew deadline");
                        }
                    }
                    changed = until.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        continue;
                    }
                }
            }
            if until.changed().await.is_err() {
                return;
            }
        }
    }
}

/// What one attempt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    /// The lease is ours (created, renewed or taken over).
    Holding,
    /// Someone else holds it and it has not expired.
    Standby,
}

/// The lease record a standby watches for change.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    holder: Option<String>,
    renew: Option<String>,
    transitions: Option<i32>,
}

/// Campaigns for and renews the lease (see the module docs).
#[derive(Debug)]
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    clock: Clock,
    field_manager: String,
    leadership: Leadership,
    observed: Option<(Record, Instant)>,
}

impl LeaderElector {
    /// An elector for `config` (validated) and the [`Leadership`] it drives.
    pub fn new(
        client: kube::Client,
        config: LeaseConfig,
        clock: Clock,
        field_manager: &str,
    ) -> (Self, Leadership) {
        let leadership = Leadership::new(false);
        let api = Api::namespaced(client, &config.namespace);
        (
            Self {
                api,
                config,
                clock,
                field_manager: field_manager.to_string(),
                leadership: leadership.clone(),
                observed: None,
            },
            leadership,
        )
    }

    /// Campaigns until `shutdown` turns true, then releases the lease if held.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let watchdog = tokio::spawn(self.leadership.clone().watchdog());
        let mut next = Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => break,
                _ = tokio::time::sleep_until(next) => {}
            }
            let sent = Instant::now();
            next = sent + self.config.retry_period;
            let outcome =
                tokio::time::timeout(self.config.renew_deadline, self.try_acquire_or_renew(sent))
                    .await;
            match outcome {
                Ok(Ok(Attempt::Holding)) => self
                    .leadership
                    .renewed(acting_until(sent, self.config.renew_deadline)),
                Ok(Ok(Attempt::Standby)) => self.leadership.stop("another replica holds the lease"),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, lease = %self.config.name, "lease attempt failed; retrying")
                }
                Err(_) => {
                    tracing::debug!(lease = %self.config.name, "lease attempt timed out; retrying")
                }
            }
        }
        let was_leading = self.leadership.is_leading();
        self.leadership.stop("shutting down");
        watchdog.abort();
        if was_leading {
            match tokio::time::timeout(self.config.retry_period, self.release()).await {
                Ok(Ok(())) => tracing::info!(lease = %self.config.name, "released the lease"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not release the lease; it expires by itself")
                }
                Err(_) => tracing::warn!("releasing the lease timed out; it expires by itself"),
            }
        }
    }

    fn now(&self) -> MicroTime {
        MicroTime(
            k8s_openapi::jiff::Timestamp::from_millisecond(self.clock.now().as_millis())
                .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        )
    }

    fn post_params(&self) -> PostParams {
        PostParams {
            field_manager: Some(self.field_manager.clone()),
            ..PostParams::default()
        }
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }

    async fn try_acquire_or_renew(&mut self, now: Instant) -> Result<Attempt, KubeError> {
        let what = || format!("lease {}/{}", self.config.namespace, self.config.name);
        let lease = match self.api.get_opt(&self.config.name).await {
            Ok(l) => l,
            Err(e) => return Err(KubeError::api(what(), e)),
        };
        let Some(mut lease) = lease else {
            let fresh = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(self.duration_seconds()),
                    acquire_time: Some(self.now()),
                    renew_time: Some(self.now()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&self.post_params(), &fresh).await {
                Ok(_) => {
                    tracing::info!(lease = %self.config.name, identity = %self.config.identity, "created the lease");
                    Ok(Attempt::Holding)
                }
                Err(e) if api_status(&e) == Some(409) => Ok(Attempt::Standby),
                Err(e) => Err(KubeError::api(what(), e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.config.identity.as_str());
        if !ours {
            let record = Record {
                holder: holder.clone(),
                renew: spec.renew_time.as_ref().map(|t| t.0.to_string()),
                transitions: spec.lease_transitions,
            };
            let observed_at = match &self.observed {
                Some((r, at)) if *r == record => *at,
                _ => {
                    self.observed = Some((record, now));
                    now
                }
            };
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.config.lease_duration, Duration::from_secs);
            if holder.is_some() && !expired(observed_at, duration, now) {
                return Ok(Attempt::Standby);
            }
        }
        let mut next = spec.clone();
        next.renew_time = Some(self.now());
        next.lease_duration_seconds = Some(self.duration_seconds());
        if !ours {
            next.holder_identity = Some(self.config.identity.clone());
            next.acquire_time = Some(self.now());
            next.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        lease.spec = Some(next);
        // `replace` sends the resourceVersion read above: a concurrent
        // writer makes this fail with 409 instead of both winning.
        match self
            .api
            .replace(&self.config.name, &self.post_params(), &lease)
            .await
        {
            Ok(_) => {
                if !ours {
                    tracing::info!(lease = %self.config.name, identity = %self.config.identity, previous = ?holder, "took over the lease");
                }
                self.observed = None;
                Ok(Attempt::Holding)
            }
            Err(e) if api_status(&e) == Some(409) => Ok(Attempt::Standby),
            Err(e) => Err(KubeError::api(what(), e)),
        }
    }

    async fn release(&self) -> Result<(), KubeError> {
        let what = || format!("lease {}/{}", self.config.namespace, self.config.name);
        let Some(mut lease) = self
            .api
            .get_opt(&self.config.name)
            .await
            .map_err(|e| KubeError::api(what(), e))?
        else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(self.now());
        lease.spec = Some(spec);
        self.api
            .replace(&self.config.name, &self.post_params(), &lease)
            .await
            .map(|_| ())
            .map_err(|e| KubeError::api(what(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leader_stops_before_a_standby_may_take_over() {
        let c = LeaseConfig::new("ns", "lease", "me");
        c.validate().unwrap();
        let sent = Instant::now();
        // The standby sees the renew no earlier than it was sent.
        let seen = sent + Duration::from_millis(1);
        let stop = acting_until(sent, c.renew_deadline);
        assert!(!expired(seen, c.lease_duration, stop));
        // The first instant a takeover is allowed, the leader stopped long ago.
        let takeover = seen + c.lease_duration;
        assert!(expired(seen, c.lease_duration, takeover));
        assert!(takeover >= stop + c.write_budget());
    }

    #[test]
    fn timings_must_be_ordered() {
        let mut c = LeaseConfig::new("ns", "lease", "me");
        c.renew_deadline = c.lease_duration;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("--renew-deadline") && e.contains("less than --lease-duration"),
            "{e}"
        );
        let mut c = LeaseConfig::new("ns", "lease", "me");
        c.retry_period = Duration::from_secs(10);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("--retry-period"), "{e}");
        let c = LeaseConfig::new("ns", "lease", "");
        assert!(c.validate().unwrap_err().to_string().contains("--identity"));
    }

    #[tokio::test(start_paused = true)]
    async fn leadership_expires_at_the_renew_deadline_without_renewal() {
        let l = Leadership::new(false);
        let mut active = l.active();
        tokio::spawn(l.clone().watchdog());
        assert!(!l.is_leading());
        l.renewed(acting_until(Instant::now(), Duration::from_secs(10)));
        assert!(l.is_leading() && *active.borrow_and_update());
        assert!(l.may_write().is_ok());
        tokio::time::sleep(Duration::from_millis(9_999)).await;
        assert!(l.is_leading());
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(!l.is_leading());
        assert!(l.may_write().is_err());
        active.changed().await.unwrap();
        assert!(!*active.borrow());
    }
}
