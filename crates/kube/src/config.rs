//! The Kubernetes mode's flags ([`KubeArgs`]) and validated configuration
//! ([`KubeConfig`]).

use std::time::Duration;

use gpuscale_scaler::config::parse_duration;

use crate::crd::DEFAULT_DRAIN_TIMEOUT_SECONDS;
use crate::error::KubeError;
use crate::lease::LeaseConfig;
use crate::pods::DEFAULT_READINESS_GATE;

/// The field manager of every write (and the default lease holder prefix).
pub(crate) const DEFAULT_FIELD_MANAGER: &str = "gpuscale-scaler";

/// `gpuscale scaler` flags for running against a Kubernetes cluster.
#[derive(Debug, Clone, clap::Args)]
pub struct KubeArgs {
    /// Act on a Kubernetes cluster (in-cluster service account or
    /// kubeconfig): watch InferenceAutoscalers, scale their targets through
    /// /scale with readiness gating and drain, write their status and Events.
    #[arg(long)]
    pub kubernetes: bool,
    /// Elect a leader among scaler replicas with a coordination.k8s.io Lease;
    /// only the leader acts and reports ready.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set, env = "GPUSCALE_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Name of the Lease.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "gpuscale-scaler",
        env = "GPUSCALE_LEASE_NAME"
    )]
    pub lease_name: String,
    /// Namespace of the Lease (the scaler's own; set it from the downward API).
    #[arg(
        long,
        value_name = "NAMESPACE",
        default_value = "gpuscale-system",
        env = "GPUSCALE_NAMESPACE"
    )]
    pub lease_namespace: String,
    /// This replica's identity in the Lease (its pod name, from the downward API).
    #[arg(long, value_name = "NAME", env = "GPUSCALE_IDENTITY")]
    pub identity: Option<String>,
    /// How long a Lease is valid without renewal (1s..=1h).
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration, env = "GPUSCALE_LEASE_DURATION")]
    pub lease_duration: Duration,
    /// The leader stops acting when no renewal succeeded for this long
    /// (less than --lease-duration).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration, env = "GPUSCALE_RENEW_DEADLINE")]
    pub renew_deadline: Duration,
    /// How often the Lease is renewed or tried (less than --renew-deadline).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration, env = "GPUSCALE_RETRY_PERIOD")]
    pub retry_period: Duration,
    /// The pod readiness-gate condition the agent sets when an engine is warm.
    #[arg(long, value_name = "CONDITION", default_value = DEFAULT_READINESS_GATE, env = "GPUSCALE_READINESS_GATE")]
    pub readiness_gate: String,
    /// Drain timeout for InferenceAutoscalers that do not set
    /// spec.drainTimeoutSeconds (1s..=1h).
    #[arg(long, value_name = "DURATION", default_value = "300s", value_parser = parse_duration, env = "GPUSCALE_DRAIN_TIMEOUT")]
    pub drain_timeout: Duration,
}

/// The Kubernetes mode, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeConfig {
    /// `None`: no election, this replica always acts.
    pub lease: Option<LeaseConfig>,
    /// Identity in Events (`reportingInstance`) and the Lease.
    pub identity: String,
    /// Field manager of every write.
    pub field_manager: String,
    pub readiness_gate: String,
    /// Drain timeout when the spec sets none.
    pub default_drain_timeout: Duration,
    /// How often drains are advanced and status is written.
    pub sync_period: Duration,
    /// Longest a status or Event write may take.
    pub request_timeout: Duration,
}

impl KubeConfig {
    /// No election, identity `gpuscale-scaler`, the default gate, a 300 s
    /// default drain timeout, a 1 s sync period and 5 s request timeout.
    pub fn new() -> Self {
        Self {
            lease: None,
            identity: DEFAULT_FIELD_MANAGER.into(),
            field_manager: DEFAULT_FIELD_MANAGER.into(),
            readiness_gate: DEFAULT_READINESS_GATE.into(),
            default_drain_timeout: Duration::from_secs(u64::from(DEFAULT_DRAIN_TIMEOUT_SECONDS)),
            sync_period: Duration::from_secs(1),
            request_timeout: Duration::from_secs(5),
        }
    }

    /// Checks every field; the error names the flag, the value and what is allowed.
    pub fn validate(&self) -> Result<(), KubeError> {
        if let Some(lease) = &self.lease {
            lease.validate()?;
        }
        let d = self.default_drain_timeout;
        if d < Duration::from_secs(1) || d > Duration::from_secs(3600) {
            return Err(KubeError::config(
                "--drain-timeout",
                format!("{d:?}"),
                "1s..=1h",
            ));
        }
        let gate = self.readiness_gate.as_str();
        if !gpuscale_core::names::is_label_key(gate) {
            return Err(KubeError::config(
                "--readiness-gate",
                gate,
                "a condition type in label-key form, e.g. gpuscale.dev/engine-warm",
            ));
        }
        if self.field_manager.is_empty() || self.field_manager.len() > 128 {
            return Err(KubeError::config(
                "field_manager",
                &self.field_manager,
                "1..=128 characters",
            ));
        }
        if self.sync_period.is_zero() || self.request_timeout.is_zero() {
            return Err(KubeError::config(
                "sync_period",
                format!("{:?}", self.sync_period),
                "more than 0",
            ));
        }
        Ok(())
    }
}

impl Default for KubeConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl KubeArgs {
    /// The validated configuration these flags describe.
    pub fn to_config(&self) -> Result<KubeConfig, KubeError> {
        let mut config = KubeConfig::new();
        config.readiness_gate = self.readiness_gate.clone();
        config.default_drain_timeout = self.drain_timeout;
        let identity = self.identity.clone().filter(|i| !i.is_empty());
        if self.leader_elect {
            let Some(identity) = identity else {
                return Err(KubeError::config(
                    "--identity",
                    "",
                    "this replica's unique name (set GPUSCALE_IDENTITY from the pod name with the downward API), required with --leader-elect",
                ));
            };
            let mut lease = LeaseConfig::new(&self.lease_namespace, &self.lease_name, &identity);
            lease.lease_duration = self.lease_duration;
            lease.renew_deadline = self.renew_deadline;
            lease.retry_period = self.retry_period;
            config.identity = identity;
            config.lease = Some(lease);
        } else if let Some(identity) = identity {
            config.identity = identity;
        }
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        kube: KubeArgs,
    }

    fn parse(args: &[&str]) -> Result<KubeConfig, KubeError> {
        let mut all = vec!["test"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all)
            .expect("flags parse")
            .kube
            .to_config()
    }

    #[test]
    fn documented_defaults_hold() {
        let c = parse(&["--kubernetes", "--identity", "scaler-0"]).unwrap();
        let lease = c.lease.unwrap();
        assert_eq!(lease.lease_duration, Duration::from_secs(15));
        assert_eq!(lease.renew_deadline, Duration::from_secs(10));
        assert_eq!(lease.retry_period, Duration::from_secs(2));
        assert_eq!(lease.name, "gpuscale-scaler");
        assert_eq!(lease.namespace, "gpuscale-system");
        assert_eq!(c.readiness_gate, "gpuscale.dev/engine-warm");
        assert_eq!(c.default_drain_timeout, Duration::from_secs(300));
        let c = parse(&["--leader-elect=false"]).unwrap();
        assert!(c.lease.is_none());
    }

    #[test]
    fn bad_flags_name_the_flag() {
        let e = parse(&["--kubernetes"]).unwrap_err().to_string();
        assert!(e.contains("--identity"), "{e}");
        let e = parse(&["--identity", "a", "--renew-deadline", "20s"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--renew-deadline"), "{e}");
        let e = parse(&["--identity", "a", "--readiness-gate", "Not A Gate"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--readiness-gate"), "{e}");
        let e = parse(&["--identity", "a", "--drain-timeout", "2h"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--drain-timeout"), "{e}");
    }
}
