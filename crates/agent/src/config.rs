//! The agent's configuration: command-line flags ([`AgentArgs`]) and the
//! validated [`AgentConfig`] the library runs with.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use gpuscale_core::NodeName;
use gpuscale_core::bounds::duration_within;
use gpuscale_core::config_text;
use gpuscale_telemetry::fake::FakeNodeConfig;

use crate::backoff::BackoffConfig;
use crate::error::AgentError;

/// Shortest and longest sampling interval.
pub(crate) const INTERVAL_RANGE: (Duration, Duration) =
    (Duration::from_millis(10), Duration::from_secs(3600));

/// What an agent runs with. Build it with [`AgentConfig::new`] and adjust the
/// public fields; [`crate::Agent::new`] validates it.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// The scaler's gRPC endpoint, `http://host:port` or `https://host:port`.
    pub scaler_url: String,
    /// This node's name as the scaler will know it.
    pub node_name: NodeName,
    /// How often every source is sampled (the scaler may change it).
    pub sample_interval: Duration,
    /// Where to serve `/metrics` and `/healthz`; `None`: not served.
    pub metrics_addr: Option<SocketAddr>,
    pub backoff: BackoffConfig,
    /// Longest wait for a TCP connection to the scaler.
    pub connect_timeout: Duration,
    /// Longest wait for one source in one round before it counts as failed.
    pub source_timeout: Duration,
    /// Reported in the agent's health: whether NVML was loaded.
    pub nvml_available: bool,
    /// Reported in the agent's health: whether the PodResources API answers.
    pub pod_resources_available: bool,
    /// How the uplink proves who it is and checks the scaler (TLS, token).
    pub uplink_security: UplinkSecurity,
}

/// TLS and credentials of the uplink.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UplinkSecurity {
    /// PEM CA bundle the scaler's certificate is verified against (required
    /// for `https://`).
    pub ca_file: Option<PathBuf>,
    /// The name the scaler's certificate must carry; default: the URL's host.
    pub server_name: Option<String>,
    /// A file holding the bearer token sent with every stream (the
    /// projected ServiceAccount token); read again at each connection, so
    /// the kubelet's rotation is picked up.
    pub token_file: Option<PathBuf>,
    /// A client certificate and key (PEM), for mutual TLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl AgentConfig {
    /// Defaults: 1 s interval, no metrics endpoint, 250 ms → 30 s backoff,
    /// 5 s connect timeout, 5 s source timeout.
    pub fn new(scaler_url: impl Into<String>, node_name: impl Into<String>) -> Self {
        Self {
            scaler_url: scaler_url.into(),
            node_name: NodeName::new(node_name),
            sample_interval: Duration::from_secs(1),
            metrics_addr: None,
            backoff: BackoffConfig::default(),
            connect_timeout: Duration::from_secs(5),
            source_timeout: Duration::from_secs(5),
            nvml_available: false,
            pod_resources_available: false,
            uplink_security: UplinkSecurity::default(),
        }
    }

    /// Checks every field; the error names the field, the value and what is allowed.
    pub fn validate(&self) -> Result<(), AgentError> {
        validate_url(&self.scaler_url, "--scaler")?;
        let name = self.node_name.as_str();
        if name.is_empty()
            || name.len() > 253
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        {
            return Err(AgentError::config(
                "--node-name",
                name,
                "1..=253 characters of letters, digits, '-', '.', '_'",
            ));
        }
        check_interval("--interval", self.sample_interval)?;
        let tls = self.scaler_url.starts_with("https://");
        let sec = &self.uplink_security;
        if tls && sec.ca_file.is_none() {
            return Err(AgentError::config(
                "--ca-file",
                "(not given)",
                "the CA bundle (PEM) that signed the scaler's certificate, required for an https:// scaler",
            ));
        }
        if !tls && (sec.ca_file.is_some() || sec.server_name.is_some() || sec.client_cert.is_some())
        {
            return Err(AgentError::config(
                "--scaler",
                &self.scaler_url,
                "an https:// URL when --ca-file, --server-name or --tls-cert is given",
            ));
        }
        self.backoff.validate()?;
        for (field, d) in [
            ("connect_timeout", self.connect_timeout),
            ("source_timeout", self.source_timeout),
        ] {
            if d.is_zero() || d > Duration::from_secs(600) {
                return Err(AgentError::config(
                    field,
                    format!("{d:?}"),
                    "more than 0 and at most 10m",
                ));
            }
        }
        Ok(())
    }
}

pub(crate) fn check_interval(field: &str, d: Duration) -> Result<(), AgentError> {
    duration_within(d, INTERVAL_RANGE.0, INTERVAL_RANGE.1)
        .map_err(|e| AgentError::out_of_range(field, e))
}

fn validate_url(url: &str, flag: &str) -> Result<(), AgentError> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    let ok = match rest {
        Some(rest) => {
            let host_port = rest.trim_end_matches('/');
            !host_port.is_empty() && !host_port.contains('/') && !host_port.contains(' ')
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(AgentError::config(
            flag,
            url,
            "an http:// or https:// URL with a host and optional port, e.g. http://gpuscale-scaler:7070",
        ))
    }
}

pub use gpuscale_core::time::parse_duration;

/// `gpuscale agent` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// The scaler's gRPC endpoint, e.g. http://gpuscale-scaler:7070
    /// (required unless --once).
    #[arg(
        long,
        value_name = "URL",
        env = "GPUSCALE_SCALER_URL",
        required_unless_present = "once"
    )]
    pub scaler: Option<String>,
    /// This node's name; defaults to $NODE_NAME, then the host name.
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Sampling interval (10ms..=1h), e.g. 500ms, 1s, 2m.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration, env = "GPUSCALE_INTERVAL")]
    pub interval: Duration,
    /// Simulate the node from this YAML or JSON file (GPUs, engines, load
    /// curve) instead of reading NVML and engines.
    #[arg(long, value_name = "FILE", env = "GPUSCALE_FAKE_CONFIG")]
    pub fake_config: Option<PathBuf>,
    /// Serve /metrics and /healthz on this address; `off` disables it.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "0.0.0.0:9400",
        env = "GPUSCALE_METRICS_ADDR"
    )]
    pub metrics_addr: String,
    /// First reconnect delay; doubles per failed attempt up to --backoff-cap.
    #[arg(long, value_name = "DURATION", default_value = "250ms", value_parser = parse_duration)]
    pub backoff_base: Duration,
    /// Longest reconnect delay.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub backoff_cap: Duration,
    /// CA bundle (PEM) the scaler's certificate is verified against
    /// (required for an https:// scaler; the gpuscale-ca ConfigMap).
    #[arg(long, value_name = "FILE", env = "GPUSCALE_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// The name the scaler's certificate must carry (default: the URL's host).
    #[arg(long, value_name = "NAME", env = "GPUSCALE_SERVER_NAME")]
    pub server_name: Option<String>,
    /// Send this file's content as a bearer token with every stream (the
    /// projected ServiceAccount token with audience gpuscale); read again at
    /// each connection.
    #[arg(long, value_name = "FILE", env = "GPUSCALE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; its DNS name is this node's name.
    #[arg(
        long,
        value_name = "FILE",
        env = "GPUSCALE_TLS_CERT",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(
        long,
        value_name = "FILE",
        env = "GPUSCALE_TLS_KEY",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// Allow an http:// (plaintext) scaler URL: for local use only.
    #[arg(long, env = "GPUSCALE_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,
    /// The node's sources (NVML, PodResources, engines, Kubernetes), `--once`.
    #[command(flatten)]
    pub node: crate::node::NodeArgs,
}

impl AgentArgs {
    /// The validated configuration these flags describe, and the fake node
    /// configuration when `--fake-config` is given.
    pub fn to_config(&self) -> Result<(AgentConfig, Option<FakeNodeConfig>), AgentError> {
        let node_name = match &self.node_name {
            Some(n) => n.clone(),
            None => host_name().ok_or_else(|| {
                AgentError::config(
                    "--node-name",
                    "",
                    "a node name: pass --node-name or set NODE_NAME (the host name could not be read)",
                )
            })?,
        };
        let Some(scaler) = self.scaler.clone() else {
            return Err(AgentError::config(
                "--scaler",
                "(not given)",
                "the scaler's URL, e.g. http://gpuscale-scaler:7070 (only --once runs without one)",
            ));
        };
        let mut config = AgentConfig::new(scaler, node_name);
        config.sample_interval = self.interval;
        config.metrics_addr = match self.metrics_addr.as_str() {
            "off" | "" => None,
            addr => Some(addr.parse().map_err(|_| {
                AgentError::config(
                    "--metrics-addr",
                    addr,
                    "an IP:port such as 0.0.0.0:9400, or `off`",
                )
            })?),
        };
        config.backoff.base = self.backoff_base;
        config.backoff.cap = self.backoff_cap;
        if config.backoff.base > config.backoff.cap {
            return Err(AgentError::config(
                "--backoff-base",
                format!("{:?}", self.backoff_base),
                format!("at most --backoff-cap ({:?})", self.backoff_cap),
            ));
        }
        if config.backoff.cap > Duration::from_secs(3600) {
            return Err(AgentError::config(
                "--backoff-cap",
                format!("{:?}", self.backoff_cap),
                "at most 1h",
            ));
        }
        if self.backoff_base.is_zero() {
            return Err(AgentError::config("--backoff-base", "0s", "more than 0"));
        }
        config.uplink_security = UplinkSecurity {
            ca_file: self.ca_file.clone(),
            server_name: self.server_name.clone(),
            token_file: self.token_file.clone(),
            client_cert: self.tls_cert.clone().zip(self.tls_key.clone()),
        };
        config.validate()?;
        let fake = self
            .fake_config
            .as_ref()
            .map(|p| load_fake_config(p))
            .transpose()?;
        if config.scaler_url.starts_with("http://") && !self.insecure_plaintext {
            return Err(AgentError::config(
                "--scaler",
                &config.scaler_url,
                "an https:// URL with --ca-file (the scaler serves TLS), or pass --insecure-plaintext for a local plaintext scaler",
            ));
        }
        if config.scaler_url.starts_with("https://") && self.insecure_plaintext {
            return Err(AgentError::config(
                "--insecure-plaintext",
                "true",
                "only with an http:// scaler URL",
            ));
        }
        Ok((config, fake))
    }
}

impl AgentArgs {
    /// This node's name (`--node-name`, `$NODE_NAME`, else the host name),
    /// checked with the sampling interval, for modes without a scaler (`--once`).
    pub(crate) fn resolved_node_name(&self) -> Result<gpuscale_core::NodeName, AgentError> {
        let name = match &self.node_name {
            Some(n) => n.clone(),
            None => host_name().ok_or_else(|| {
                AgentError::config(
                    "--node-name",
                    "",
                    "a node name: pass --node-name or set NODE_NAME (the host name could not be read)",
                )
            })?,
        };
        let mut check = AgentConfig::new("http://localhost", name);
        check.sample_interval = self.interval;
        check.validate()?;
        Ok(check.node_name)
    }
}

/// Reads a fake node configuration from YAML or JSON (JSON is YAML).
///
/// As the scaler's configuration files ([`gpuscale_core::config_text`]): at
/// most 1 MiB is read, more than 64 unclosed `[`/`{` is refused in one
/// linear pass before the YAML parser runs, and the parser's message quotes
/// at most a bounded prefix of a bad value.
pub fn load_fake_config(path: &std::path::Path) -> Result<FakeNodeConfig, AgentError> {
    let fail = |message: String| AgentError::ConfigFile {
        flag: "--fake-config",
        path: path.display().to_string(),
        message,
    };
    let text = read_bounded(path).map_err(fail)?;
    config_text::check_nesting(&text, config_text::MAX_CONFIG_DEPTH).map_err(fail)?;
    let config: FakeNodeConfig = serde_yaml::from_str(&text)
        .map_err(|e| fail(config_text::bound_message(&e.to_string())))?;
    config.validate().map_err(|e| fail(e.message))?;
    Ok(config)
}

/// At most [`config_text::MAX_CONFIG_BYTES`] of `path` as text; a longer
/// file is refused without reading the rest.
fn read_bounded(path: &std::path::Path) -> Result<String, String> {
    let limit = config_text::MAX_CONFIG_BYTES;
    config_text::bounded_text(read_at_most(path, limit)?, limit)
}

/// At most `limit` bytes of `path` (the agent's configuration, certificate
/// and token files); a longer file is refused without reading the rest.
pub(crate) fn read_at_most(path: &std::path::Path, limit: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(limit.saturating_add(1)).read_to_end(&mut bytes))
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > limit {
        return Err(format!(
            "the file is larger than {limit} bytes, the most it may be"
        ));
    }
    Ok(bytes)
}

fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("10").expect_err("no unit").contains("unit"));
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn bad_url_and_interval_name_the_flag() {
        let mut c = AgentConfig::new("gpuscale-scaler:7070", "node-a");
        let e = c.validate().expect_err("no scheme").to_string();
        assert!(e.contains("--scaler") && e.contains("http://"), "{e}");
        c.scaler_url = "http://scaler:7070".into();
        c.sample_interval = Duration::from_millis(1);
        let e = c.validate().expect_err("too short").to_string();
        assert!(e.contains("--interval") && e.contains("10ms..=1h"), "{e}");
        c.sample_interval = Duration::from_secs(1);
        c.node_name = NodeName::new("bad name");
        assert!(
            c.validate()
                .expect_err("space")
                .to_string()
                .contains("--node-name")
        );
    }

    fn args(extra: &[&str]) -> AgentArgs {
        use clap::Parser;
        #[derive(Debug, Parser)]
        struct Cli {
            #[command(flatten)]
            agent: AgentArgs,
        }
        let mut all = vec!["test", "--node-name", "node-a"];
        all.extend_from_slice(extra);
        Cli::try_parse_from(all).expect("flags parse").agent
    }

    #[test]
    fn plaintext_needs_the_flag_and_https_needs_a_ca() {
        let e = args(&["--scaler", "http://scaler:7070"])
            .to_config()
            .expect_err("plaintext")
            .to_string();
        assert!(
            e.contains("--insecure-plaintext") && e.contains("https://"),
            "{e}"
        );
        let (c, _) = args(&["--scaler", "http://scaler:7070", "--insecure-plaintext"])
            .to_config()
            .expect("plaintext asked for");
        assert_eq!(c.uplink_security, UplinkSecurity::default());
        let e = args(&["--scaler", "https://scaler:7070"])
            .to_config()
            .expect_err("no CA")
            .to_string();
        assert!(e.contains("--ca-file"), "{e}");
        let (c, _) = args(&[
            "--scaler",
            "https://scaler:7070",
            "--ca-file",
            "/ca.crt",
            "--token-file",
            "/token",
            "--server-name",
            "gpuscale-scaler.gpuscale-system.svc",
        ])
        .to_config()
        .expect("TLS with a token");
        assert_eq!(c.uplink_security.token_file, Some(PathBuf::from("/token")));
        let e = args(&[
            "--scaler",
            "http://scaler:7070",
            "--insecure-plaintext",
            "--ca-file",
            "/ca.crt",
        ])
        .to_config()
        .expect_err("a CA for plaintext")
        .to_string();
        assert!(e.contains("https://"), "{e}");
    }

    #[test]
    fn fake_config_file_errors_name_the_flag_and_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.yaml");
        std::fs::write(&path, "gpus: [{count: 0}]\n").expect("write");
        let e = load_fake_config(&path).expect_err("zero GPUs").to_string();
        assert!(
            e.contains("--fake-config") && e.contains("gpus[0].count"),
            "{e}"
        );
        std::fs::write(&path, "gpus: [{count: 2}]\nengines: [{pod: a, model: m}]\n")
            .expect("write");
        let c = load_fake_config(&path).expect("valid");
        assert_eq!(c.gpus[0].count, 2);
        std::fs::write(&path, "{\"gpus\": [{\"count\": 1}], \"extra\": 1}").expect("write");
        let e = load_fake_config(&path)
            .expect_err("unknown field")
            .to_string();
        assert!(e.contains("extra"), "{e}");
    }

    #[test]
    fn fake_config_reads_are_bounded_and_deep_nesting_is_refused_before_parsing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.yaml");
        let path_s = path.to_str().expect("utf-8");
        let load = |bytes: &[u8]| {
            std::fs::write(&path, bytes).expect("write");
            load_fake_config(&path).expect_err("refused").to_string()
        };
        // 200 KB of nested `[`: refused by the depth check, not the parser.
        let e = load(format!("gpus: {}", "[".repeat(200 * 1024)).as_bytes());
        assert!(
            e.contains("--fake-config")
                && e.contains(path_s)
                && e.contains("nesting depth exceeds 64"),
            "{e}"
        );
        // Over 1 MiB (a valid file padded with comments): refused.
        let mut big = b"# padding\n".repeat(110 * 1024);
        big.extend_from_slice(b"gpus: [{count: 1}]\n");
        let e = load(&big);
        assert!(e.contains("larger than 1048576 bytes"), "{e}");
        let e = load(b"gpus: [{count: 1}]\n\xff\n");
        assert!(e.contains("not UTF-8") && e.contains("offset 19"), "{e}");
        // A 10 MB bad value is echoed as a bounded prefix.
        let huge = "x".repeat(10 * 1024 * 1024);
        let e = load(format!("gpus: [{{count: {huge}}}]\n").as_bytes());
        assert!(
            e.len() < 1024 && e.contains("--fake-config"),
            "{} bytes",
            e.len()
        );
        let e = load_fake_config(&dir.path().join("missing.yaml"))
            .expect_err("missing")
            .to_string();
        assert!(e.contains("missing.yaml"), "{e}");
    }
}
