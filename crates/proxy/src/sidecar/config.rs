//! `gpuscale proxy` flags and their validated form.

use std::net::SocketAddr;
use std::time::Duration;

use gpuscale_core::time::parse_duration;
use gpuscale_core::{PodRef, ServingAddr};

use crate::admission::Limit;
use crate::error::ProxyError;
use crate::forward::ForwardConfig;

/// `gpuscale proxy` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// Where clients connect (the pod's Service targets this port).
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "0.0.0.0:8080",
        env = "GPUSCALE_PROXY_LISTEN"
    )]
    pub listen: String,
    /// The engine in the same pod: http://host:port.
    #[arg(
        long,
        value_name = "URL",
        default_value = "http://127.0.0.1:8000",
        env = "GPUSCALE_PROXY_UPSTREAM"
    )]
    pub upstream: String,
    /// /healthz, /readyz, /drain and /metrics; `off` disables them.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "0.0.0.0:9091",
        env = "GPUSCALE_PROXY_ADMIN_ADDR"
    )]
    pub admin_addr: String,
    /// The node agent's ServingService (batch limit, drain; stats are
    /// reported to it): `unix:/path`, `host:port`, or `off`.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "unix:/run/gpuscale/serving.sock",
        env = "GPUSCALE_SERVING_ADDR"
    )]
    pub agent: String,
    /// This pod as `namespace/name` (default: $POD_NAMESPACE/$POD_NAME,
    /// from the downward API). Needed unless --agent is off.
    #[arg(long, value_name = "NAMESPACE/NAME", env = "GPUSCALE_POD")]
    pub pod: Option<String>,
    /// The served model name reported with the stats (empty: the scraped
    /// engine's, when the agent also scrapes it).
    #[arg(long, value_name = "NAME", default_value = "", env = "GPUSCALE_MODEL")]
    pub model: String,
    /// The batch limit until the agent sends one, and while it sends none:
    /// a number (1..=1000000) or `unlimited`.
    #[arg(long, value_name = "N", default_value = "unlimited")]
    pub batch_limit: String,
    /// Longest admission queue; past it requests get 429 (0..=1000000).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_queue: usize,
    /// Longest a request waits in the queue before a 503 (1ms..=1h).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub queue_timeout: Duration,
    /// The `Retry-After` of 429 and 503 answers (0s..=1h).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub retry_after: Duration,
    /// How long a drain waits for in-flight requests (1s..=24h).
    #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// How often stats are reported to the agent (100ms..=1m).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub report_interval: Duration,
    /// A POST path (or path prefix ending in `/`) forwarded without a slot
    /// and not measured, repeatable. GET, HEAD and OPTIONS requests always are.
    #[arg(long = "unlimited-path", value_name = "PATH", default_values_t = default_unlimited_paths())]
    pub unlimited_paths: Vec<String>,
    /// Deadline of a new connection to the engine.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Keep connections to the engine alive between requests (saves a
    /// loopback connect per request). Off by default: llama.cpp's server
    /// closes its connection after each streamed response without saying
    /// so. Safe with vLLM, SGLang, TGI (idle connections close after 4 s).
    #[arg(long)]
    pub reuse_upstream_connections: bool,
}

fn default_unlimited_paths() -> Vec<String> {
    ["/tokenize", "/detokenize", "/v1/tokenize", "/v1/detokenize"]
        .map(String::from)
        .to_vec()
}

/// The validated configuration of `gpuscale proxy`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    pub upstream: String,
    pub admin: Option<SocketAddr>,
    pub agent: Option<ServingAddr>,
    pub pod: Option<PodRef>,
    pub model: String,
    /// The limit while the agent sends none.
    pub default_limit: Limit,
    pub max_queue: usize,
    pub queue_timeout: Duration,
    pub retry_after: Duration,
    pub drain_timeout: Duration,
    pub report_interval: Duration,
    pub unlimited_paths: Vec<String>,
    pub forward: ForwardConfig,
}

impl ProxyConfig {
    /// Defaults for a proxy on `listen` in front of `upstream`, no agent.
    pub fn new(listen: SocketAddr, upstream: impl Into<String>) -> Self {
        Self {
            listen,
            upstream: upstream.into(),
            admin: None,
            agent: None,
            pod: None,
            model: String::new(),
            default_limit: Limit::Unlimited,
            max_queue: 1024,
            queue_timeout: Duration::from_secs(60),
            retry_after: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(120),
            report_interval: Duration::from_secs(1),
            unlimited_paths: default_unlimited_paths(),
            forward: ForwardConfig::default(),
        }
    }

    /// Checks every value; the error names the flag, the value and the range.
    pub fn validate(&self) -> Result<(), ProxyError> {
        fn within(flag: &str, d: Duration, lo: Duration, hi: Duration) -> Result<(), ProxyError> {
            if d < lo || d > hi {
                return Err(ProxyError::config(
                    flag,
                    format!("{d:?}"),
                    format!("between {lo:?} and {hi:?}"),
                ));
            }
            Ok(())
        }
        const MS: Duration = Duration::from_millis(1);
        within(
            "--queue-timeout",
            self.queue_timeout,
            MS,
            Duration::from_secs(3600),
        )?;
        within(
            "--retry-after",
            self.retry_after,
            Duration::ZERO,
            Duration::from_secs(3600),
        )?;
        within(
            "--drain-timeout",
            self.drain_timeout,
            Duration::from_secs(1),
            Duration::from_secs(86_400),
        )?;
        within(
            "--report-interval",
            self.report_interval,
            Duration::from_millis(100),
            Duration::from_secs(60),
        )?;
        within(
            "--connect-timeout",
            self.forward.connect_timeout,
            MS,
            Duration::from_secs(600),
        )?;
        if self.max_queue > 1_000_000 {
            return Err(ProxyError::config(
                "--max-queue",
                self.max_queue,
                "between 0 and 1000000",
            ));
        }
        if let Limit::At(n) = self.default_limit
            && !(1..=1_000_000).contains(&n)
        {
            return Err(ProxyError::config(
                "--batch-limit",
                n,
                "a number between 1 and 1000000, or `unlimited`",
            ));
        }
        if self.agent.is_some() && self.pod.is_none() {
            return Err(ProxyError::config(
                "--pod",
                "",
                "namespace/name of this pod (or POD_NAMESPACE and POD_NAME set) when --agent is not off",
            ));
        }
        for p in &self.unlimited_paths {
            if !p.starts_with('/') {
                return Err(ProxyError::config(
                    "--unlimited-path",
                    p,
                    "a path starting with /",
                ));
            }
        }
        crate::forward::Forwarder::new(&self.upstream, &self.forward)?;
        Ok(())
    }
}

fn parse_addr(flag: &str, s: &str) -> Result<SocketAddr, ProxyError> {
    s.trim()
        .parse()
        .map_err(|_| ProxyError::config(flag, s, "an IP:port such as 0.0.0.0:8080"))
}

/// `namespace/name`.
pub fn parse_pod(flag: &str, s: &str) -> Result<PodRef, ProxyError> {
    match s.trim().split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(PodRef::new(ns, name))
        }
        _ => Err(ProxyError::config(flag, s, "namespace/name")),
    }
}

impl ProxyArgs {
    /// The validated configuration; `env` reads `POD_NAMESPACE`/`POD_NAME`
    /// when `--pod` is absent.
    pub fn to_config(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<ProxyConfig, ProxyError> {
        let mut c = ProxyConfig::new(parse_addr("--listen", &self.listen)?, self.upstream.trim());
        c.admin = match self.admin_addr.trim() {
            "off" | "" => None,
            a => Some(parse_addr("--admin-addr", a)?),
        };
        c.agent = ServingAddr::parse(&self.agent)
            .map_err(|allowed| ProxyError::config("--agent", self.agent.trim(), allowed))?;
        c.pod = match &self.pod {
            Some(p) => Some(parse_pod("--pod", p)?),
            None => match (env("POD_NAMESPACE"), env("POD_NAME")) {
                (Some(ns), Some(name)) if !ns.is_empty() && !name.is_empty() => {
                    Some(PodRef::new(ns, name))
                }
                _ => None,
            },
        };
        c.model = self.model.trim().to_string();
        c.default_limit = match self.batch_limit.trim() {
            "unlimited" => Limit::Unlimited,
            n => Limit::At(n.parse().map_err(|_| {
                ProxyError::config(
                    "--batch-limit",
                    n,
                    "a number between 1 and 1000000, or `unlimited`",
                )
            })?),
        };
        c.max_queue = self.max_queue;
        c.queue_timeout = self.queue_timeout;
        c.retry_after = self.retry_after;
        c.drain_timeout = self.drain_timeout;
        c.report_interval = self.report_interval;
        c.unlimited_paths = self.unlimited_paths.clone();
        c.forward.connect_timeout = self.connect_timeout;
        c.forward.reuse_connections = self.reuse_upstream_connections;
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: ProxyArgs,
    }

    fn config(flags: &[&str]) -> Result<ProxyConfig, ProxyError> {
        let mut argv = vec!["proxy"];
        argv.extend_from_slice(flags);
        Cli::try_parse_from(argv).unwrap().args.to_config(|_| None)
    }

    #[test]
    fn defaults_need_a_pod_for_the_agent() {
        let e = config(&[]).unwrap_err().to_string();
        assert!(e.contains("--pod"), "{e}");
        let c = config(&["--pod", "llm/llama-0"]).unwrap();
        assert_eq!(c.pod, Some(PodRef::new("llm", "llama-0")));
        assert_eq!(
            c.agent,
            Some(ServingAddr::Unix(PathBuf::from(
                "/run/gpuscale/serving.sock"
            )))
        );
        assert_eq!(c.default_limit, Limit::Unlimited);
        assert_eq!(c.queue_timeout, Duration::from_secs(60));
        let env = |k: &str| Some(if k == "POD_NAME" { "p-1" } else { "ns" }.to_string());
        let c = Cli::try_parse_from(["proxy"])
            .unwrap()
            .args
            .to_config(env)
            .unwrap();
        assert_eq!(c.pod, Some(PodRef::new("ns", "p-1")));
    }

    #[test]
    fn bad_flags_name_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--agent", "off", "--batch-limit", "0"], "--batch-limit"),
            (
                &["--agent", "off", "--batch-limit", "many"],
                "--batch-limit",
            ),
            (&["--agent", "off", "--listen", "8080"], "--listen"),
            (
                &["--agent", "off", "--upstream", "https://x:1"],
                "--upstream",
            ),
            (&["--agent", "unix:rel.sock", "--pod", "a/b"], "--agent"),
            (
                &["--agent", "off", "--queue-timeout", "0s"],
                "--queue-timeout",
            ),
            (
                &["--agent", "off", "--report-interval", "10ms"],
                "--report-interval",
            ),
            (
                &["--agent", "off", "--unlimited-path", "tokenize"],
                "--unlimited-path",
            ),
            (&["--pod", "nopod"], "--pod"),
        ];
        for (flags, flag) in cases {
            let e = config(flags).unwrap_err();
            assert!(e.is_config());
            assert!(e.to_string().contains(flag), "{flags:?}: {e}");
        }
    }
}
