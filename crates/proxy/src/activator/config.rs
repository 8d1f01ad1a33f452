//! `gpuscale activator` flags and their validated form.

use std::net::SocketAddr;
use std::time::Duration;

use gpuscale_core::WorkloadRef;
use gpuscale_core::time::parse_duration;

use crate::error::ProxyError;
use crate::forward::ForwardConfig;

/// `gpuscale activator` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ActivatorArgs {
    /// Where clients (or the gateway) connect.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "0.0.0.0:8080",
        env = "GPUSCALE_ACTIVATOR_LISTEN"
    )]
    pub listen: String,
    /// /healthz, /readyz and /metrics; `off` disables them.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "0.0.0.0:9092",
        env = "GPUSCALE_ACTIVATOR_ADMIN_ADDR"
    )]
    pub admin_addr: String,
    /// A workload behind the activator and the Service of its ready pods,
    /// `namespace/name=http://host:port` (repeatable). Requests are routed
    /// by their `Host` (`name`, `name.namespace`, `name.namespace.svc...`)
    /// or an `X-Gpuscale-Workload: namespace/name` header; with one
    /// workload, every request goes to it.
    #[arg(long = "workload", value_name = "NS/NAME=URL", required = true)]
    pub workloads: Vec<String>,
    /// The scaler's gRPC address (`http://host:port`), told at once when a
    /// workload without a ready replica receives a request; `off` to run
    /// without it (held requests then wait for a replica someone else
    /// starts).
    #[arg(
        long,
        value_name = "URL",
        default_value = "http://gpuscale-scaler.gpuscale-system:7070",
        env = "GPUSCALE_SCALER"
    )]
    pub scaler: String,
    /// The CA that signed the scaler's certificate (PEM), for an
    /// `https://` --scaler.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// The name to verify in the scaler's certificate (default: the URL's host).
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
    /// A bearer token for the scaler (the pod's service-account token),
    /// read again at each connection.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// This activator replica's name in reports (default $POD_NAME, else
    /// the host name).
    #[arg(long, value_name = "NAME", env = "POD_NAME")]
    pub name: Option<String>,
    /// Most requests held per workload; past it 429 (0..=1000000).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub max_held_per_workload: usize,
    /// Most requests held over all workloads; past it 429 (1..=10000000).
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub max_held: usize,
    /// Longest a request is held for a replica before a 503 (1ms..=1h).
    #[arg(long, value_name = "DURATION", default_value = "300s", value_parser = parse_duration)]
    pub hold_timeout: Duration,
    /// The `Retry-After` of 429 and 503 answers (0s..=1h).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub retry_after: Duration,
    /// The path that answers 2xx through the workload's Service once a
    /// replica is ready.
    #[arg(long, value_name = "PATH", default_value = "/health")]
    pub ready_path: String,
    /// How often a workload without a ready replica is probed (10ms..=1m);
    /// one with a ready replica every 5 times as long.
    #[arg(long, value_name = "DURATION", default_value = "250ms", value_parser = parse_duration)]
    pub probe_interval: Duration,
    /// How often held requests are reported to the scaler (100ms..=1m).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub report_interval: Duration,
    /// How often a held streaming request (`"stream": true` in its JSON
    /// body, or `Accept: text/event-stream`) receives an SSE comment
    /// (`: keep-alive`) while it waits: it is answered 200
    /// `text/event-stream` at once and the workload's stream follows,
    /// without the workload's own headers (100ms..=5m); `off`: held
    /// streams wait like other requests (one request asks for that with
    /// `X-Gpuscale-Keep-Alive: off`).
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    pub keep_alive_interval: String,
    /// Deadline of a new connection to a workload's Service.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Keep connections to the workloads' Services alive between requests.
    #[arg(long)]
    pub reuse_upstream_connections: bool,
}

/// One workload behind the activator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadRoute {
    pub workload: WorkloadRef,
    pub upstream: String,
}

/// The validated configuration of `gpuscale activator`.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivatorConfig {
    pub listen: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub workloads: Vec<WorkloadRoute>,
    pub scaler: Option<String>,
    pub ca_file: Option<std::path::PathBuf>,
    pub server_name: Option<String>,
    pub token_file: Option<std::path::PathBuf>,
    pub name: String,
    pub max_held_per_workload: usize,
    pub max_held: usize,
    pub hold_timeout: Duration,
    pub retry_after: Duration,
    pub ready_path: String,
    pub probe_interval: Duration,
    pub report_interval: Duration,
    /// SSE comments to held streaming requests this often; `None`: none.
    pub keep_alive_interval: Option<Duration>,
    pub forward: ForwardConfig,
}

impl ActivatorConfig {
    /// Defaults on `listen` for `workloads`, no scaler, no admin port.
    pub fn new(listen: SocketAddr, workloads: Vec<WorkloadRoute>) -> Self {
        Self {
            listen,
            admin: None,
            workloads,
            scaler: None,
            ca_file: None,
            server_name: None,
            token_file: None,
            name: "activator".into(),
            max_held_per_workload: 1000,
            max_held: 10_000,
            hold_timeout: Duration::from_secs(300),
            retry_after: Duration::from_secs(1),
            ready_path: "/health".into(),
            probe_interval: Duration::from_millis(250),
            report_interval: Duration::from_secs(1),
            keep_alive_interval: Some(Duration::from_secs(10)),
            forward: ForwardConfig::default(),
        }
    }

    /// Checks every field; the error names the flag.
    pub fn validate(&self) -> Result<(), ProxyError> {
        if self.workloads.is_empty() {
            return Err(ProxyError::config("--workload", "", "at least one"));
        }
        for (i, w) in self.workloads.iter().enumerate() {
            if self.workloads[..i].iter().any(|o| o.workload == w.workload) {
                return Err(ProxyError::config(
                    "--workload",
                    &w.workload,
                    "each workload once",
                ));
            }
        }
        if self.max_held_per_workload > 1_000_000 {
            return Err(ProxyError::config(
                "--max-held-per-workload",
                self.max_held_per_workload,
                "0..=1000000",
            ));
        }
        if !(1..=10_000_000).contains(&self.max_held) {
            return Err(ProxyError::config(
                "--max-held",
                self.max_held,
                "1..=10000000",
            ));
        }
        let within = |flag: &str, d: Duration, lo: Duration, hi: Duration, allowed: &str| {
            if d < lo || d > hi {
                Err(ProxyError::config(flag, format!("{d:?}"), allowed))
            } else {
                Ok(())
            }
        };
        within(
            "--hold-timeout",
            self.hold_timeout,
            Duration::from_millis(1),
            Duration::from_secs(3600),
            "1ms..=1h",
        )?;
        within(
            "--retry-after",
            self.retry_after,
            Duration::ZERO,
            Duration::from_secs(3600),
            "0s..=1h",
        )?;
        within(
            "--probe-interval",
            self.probe_interval,
            Duration::from_millis(10),
            Duration::from_secs(60),
            "10ms..=1m",
        )?;
        within(
            "--report-interval",
            self.report_interval,
            Duration::from_millis(100),
            Duration::from_secs(60),
            "100ms..=1m",
        )?;
        if let Some(every) = self.keep_alive_interval {
            within(
                "--keep-alive-interval",
                every,
                Duration::from_millis(100),
                Duration::from_secs(300),
                "100ms..=5m, or off",
            )?;
        }
        if !self.ready_path.starts_with('/') {
            return Err(ProxyError::config(
                "--ready-path",
                &self.ready_path,
                "a path starting with /",
            ));
        }
        if let Some(s) = &self.scaler {
            let tls = s.starts_with("https://");
            if !tls && !s.starts_with("http://") {
                return Err(ProxyError::config(
                    "--scaler",
                    s,
                    "an http:// or https:// URL, or `off`",
                ));
            }
            if tls && self.ca_file.is_none() {
                return Err(ProxyError::config(
                    "--scaler",
                    s,
                    "with https://, --ca-file (the CA of the scaler's certificate)",
                ));
            }
        }
        Ok(())
    }
}

fn parse_workload(s: &str) -> Result<WorkloadRoute, ProxyError> {
    let bad = || ProxyError::config("--workload", s, "namespace/name=http://host:port");
    let (w, url) = s.split_once('=').ok_or_else(bad)?;
    let (ns, name) = w.split_once('/').ok_or_else(bad)?;
    if ns.is_empty() || name.is_empty() || name.contains('/') {
        return Err(bad());
    }
    Ok(WorkloadRoute {
        workload: WorkloadRef::new(ns, name),
        upstream: url.to_string(),
    })
}

fn parse_keep_alive(s: &str) -> Result<Option<Duration>, ProxyError> {
    if s.trim() == "off" {
        return Ok(None);
    }
    parse_duration(s)
        .map(Some)
        .map_err(|e| ProxyError::config("--keep-alive-interval", s, e))
}

fn parse_addr(flag: &str, s: &str) -> Result<SocketAddr, ProxyError> {
    s.parse()
        .map_err(|_| ProxyError::config(flag, s, "an address such as 0.0.0.0:8080"))
}

impl ActivatorArgs {
    /// The validated configuration.
    pub fn to_config(&self) -> Result<ActivatorConfig, ProxyError> {
        let workloads = self
            .workloads
            .iter()
            .map(|w| parse_workload(w))
            .collect::<Result<Vec<_>, _>>()?;
        let mut c = ActivatorConfig::new(parse_addr("--listen", &self.listen)?, workloads);
        c.admin = match self.admin_addr.as_str() {
            "off" => None,
            a => Some(parse_addr("--admin-addr", a)?),
        };
        c.scaler = match self.scaler.as_str() {
            "off" => None,
            s => Some(s.to_string()),
        };
        c.ca_file = self.ca_file.clone();
        c.server_name = self.server_name.clone();
        c.token_file = self.token_file.clone();
        c.name = self
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|n| !n.is_empty()))
            .unwrap_or_else(|| "activator".into());
        c.max_held_per_workload = self.max_held_per_workload;
        c.max_held = self.max_held;
        c.hold_timeout = self.hold_timeout;
        c.retry_after = self.retry_after;
        c.ready_path = self.ready_path.clone();
        c.probe_interval = self.probe_interval;
        c.report_interval = self.report_interval;
        c.keep_alive_interval = parse_keep_alive(&self.keep_alive_interval)?;
        c.forward = ForwardConfig {
            connect_timeout: self.connect_timeout,
            reuse_connections: self.reuse_upstream_connections,
            ..ForwardConfig::default()
        };
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_parse_and_bad_ones_name_the_flag() {
        let w = parse_workload("llm/chat=http://chat.llm:8080").unwrap();
        assert_eq!(w.workload, WorkloadRef::new("llm", "chat"));
        assert_eq!(w.upstream, "http://chat.llm:8080");
        for bad in [
            "chat=http://x:1",
            "llm/chat",
            "/chat=http://x:1",
            "a/b/c=http://x:1",
        ] {
            let e = parse_workload(bad).unwrap_err().to_string();
            assert!(e.contains("--workload") && e.contains(bad), "{e}");
        }
        let mut c = ActivatorConfig::new("127.0.0.1:0".parse().unwrap(), vec![w.clone(), w]);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("each workload once")
        );
        c.workloads.pop();
        c.keep_alive_interval = Some(Duration::from_millis(10));
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("--keep-alive-interval")
        );
        assert_eq!(parse_keep_alive("off").unwrap(), None);
        assert!(
            parse_keep_alive("soon")
                .unwrap_err()
                .to_string()
                .contains("--keep-alive-interval")
        );
        assert_eq!(
            parse_keep_alive("2s").unwrap(),
            Some(Duration::from_secs(2))
        );
        c.keep_alive_interval = None;
        c.hold_timeout = Duration::ZERO;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("--hold-timeout")
        );
    }
}
