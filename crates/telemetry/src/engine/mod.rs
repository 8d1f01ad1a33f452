//! Inference engines: where they are, how to read them, and what their
//! metrics mean.
//!
//! * [`EngineTarget`]: one engine to scrape, from pod annotations or a flag.
//! * [`mapping`]: each framework's metric names mapped to one
//!   [`gpuscale_core::sample::EngineSample`] (REFERENCE §6).
//! * [`counters`]: restarts handled, so exported totals stay monotonic.
//! * [`client`]: the HTTP client (size cap, timeout, content-type check),
//!   health checks and the warm-up probe.
//! * [`scrape`]: [`ScrapeEngineSource`], every target scraped concurrently.

pub mod client;
pub mod counters;
pub mod mapping;
pub mod scrape;

use std::collections::BTreeMap;
use std::time::Duration;

use gpuscale_core::ids::PodRef;
use gpuscale_core::sample::Framework;

use crate::error::TelemetryError;

pub use client::{EngineHttpClient, HttpClientConfig, WarmupProbe};
pub use scrape::{ScrapeConfig, ScrapeEngineSource, ScrapeStats};

/// Pod annotation: the port of the engine's metrics endpoint (required).
pub const ANNOTATION_METRICS_PORT: &str = "gpuscale.dev/metrics-port";
/// Pod annotation: the metrics path (default per framework).
pub(crate) const ANNOTATION_METRICS_PATH: &str = "gpuscale.dev/metrics-path";
/// Pod annotation: the serving framework (required with a port).
pub(crate) const ANNOTATION_FRAMEWORK: &str = "gpuscale.dev/framework";
/// Pod annotation: the health/ready path (default per framework; `none` disables).
pub(crate) const ANNOTATION_HEALTH_PATH: &str = "gpuscale.dev/health-path";
/// Pod annotation: the served model name, for frameworks whose metrics carry none.
pub(crate) const ANNOTATION_MODEL: &str = "gpuscale.dev/model";

/// The namespace of an engine given by a flag without a pod (the pod name is
/// then the engine's `host:port`).
pub const STATIC_TARGET_NAMESPACE: &str = "static";

/// Framework names accepted in annotations and flags.
pub(crate) const FRAMEWORK_NAMES: &str =
    "vllm, sglang, tgi, triton-trtllm, trtllm-serve, llama-cpp";

/// One engine to scrape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineTarget {
    pub pod: PodRef,
    /// The container serving, when known (empty otherwise).
    pub container: String,
    pub framework: Framework,
    /// `http://host:port/path` of the Prometheus text endpoint.
    pub metrics_url: String,
    /// `http://host:port/path` of the health or ready endpoint; `None`: the
    /// state follows the metrics scrape alone.
    pub health_url: Option<String>,
    /// The served model name, when configured (otherwise read from labels).
    pub model: Option<String>,
    /// Overrides the source's default per-target timeout.
    pub timeout: Option<Duration>,
}

/// Parses a framework name (`vllm`, `sglang`, `tgi`, `triton-trtllm`,
/// `trtllm-serve`, `llama-cpp`, with a few common spellings).
pub(crate) fn parse_framework(field: &str, s: &str) -> Result<Framework, TelemetryError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "vllm" => Ok(Framework::Vllm),
        "sglang" => Ok(Framework::Sglang),
        "tgi" | "text-generation-inference" => Ok(Framework::Tgi),
        "triton-trtllm" | "triton" | "tensorrt-llm" | "trtllm" => Ok(Framework::TritonTrtllm),
        "trtllm-serve" => Ok(Framework::TrtllmServe),
        "llama-cpp" | "llamacpp" | "llama.cpp" | "llama-server" => Ok(Framework::LlamaCpp),
        _ => Err(TelemetryError::config(
            field,
            s,
            format!("one of {FRAMEWORK_NAMES}"),
        )),
    }
}

/// Where each framework serves Prometheus text by default (REFERENCE §6).
pub(crate) fn default_metrics_path(framework: Framework) -> &'static str {
    match framework {
        Framework::TrtllmServe => "/prometheus/metrics",
        _ => "/metrics",
    }
}

/// Each framework's cheap health/ready endpoint (REFERENCE §6.8). SGLang's
/// `/ready` rather than `/health`, which runs a generation.
pub(crate) fn default_health_path(framework: Framework) -> Option<&'static str> {
    match framework {
        Framework::Vllm | Framework::Tgi | Framework::LlamaCpp | Framework::TrtllmServe => {
            Some("/health")
        }
        Framework::Sglang => Some("/ready"),
        Framework::TritonTrtllm => Some("/v2/health/ready"),
        Framework::Push | Framework::Fake => None,
    }
}

fn check_scrapable(field: &str, framework: Framework) -> Result<(), TelemetryError> {
    match framework {
        Framework::Push | Framework::Fake => Err(TelemetryError::config(
            field,
            framework.as_str(),
            format!("a scraped framework: one of {FRAMEWORK_NAMES}"),
        )),
        _ => Ok(()),
    }
}

/// `http://host:port` of a URL, for deriving the health URL.
fn origin(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("http://")?;
    let end = rest.find('/').unwrap_or(rest.len());
    Some(&url[.."http://".len() + end])
}

fn check_url(field: &str, url: &str) -> Result<(), TelemetryError> {
    let parsed: ::http::Uri = url
        .parse()
        .map_err(|e| TelemetryError::config(field, url, format!("a valid URL ({e})")))?;
    if parsed.scheme_str() != Some("http") || parsed.host().is_none() {
        return Err(TelemetryError::config(
            field,
            url,
            "an http://host:port/path URL (engines are scraped over plain HTTP on the node)",
        ));
    }
    Ok(())
}

impl EngineTarget {
    /// A target from a pod's annotations, or `None` when the pod does not
    /// declare [`ANNOTATION_METRICS_PORT`]. `pod_ip` is the pod's IP
    /// (IPv6 without brackets is accepted).
    pub fn from_pod_annotations(
        pod: PodRef,
        pod_ip: &str,
        annotations: &BTreeMap<String, String>,
    ) -> Result<Option<EngineTarget>, TelemetryError> {
        let Some(port) = annotations.get(ANNOTATION_METRICS_PORT) else {
            return Ok(None);
        };
        let field = |a: &str| format!("{pod} annotation {a}");
        let port: u16 = port.trim().parse().ok().filter(|p| *p > 0).ok_or_else(|| {
            TelemetryError::config(field(ANNOTATION_METRICS_PORT), port, "a port 1..=65535")
        })?;
        let framework_raw = annotations.get(ANNOTATION_FRAMEWORK).ok_or_else(|| {
            TelemetryError::config(
                field(ANNOTATION_FRAMEWORK),
                "",
                format!("set with {ANNOTATION_METRICS_PORT}: one of {FRAMEWORK_NAMES}"),
            )
        })?;
        let framework = parse_framework(&field(ANNOTATION_FRAMEWORK), framework_raw)?;
        check_scrapable(&field(ANNOTATION_FRAMEWORK), framework)?;
        let path_of = |a: &str, default: &str| -> Result<String, TelemetryError> {
            let p = annotations.get(a).map_or(default, |s| s.trim());
            if !p.starts_with('/') {
                return Err(TelemetryError::config(
                    field(a),
                    p,
                    "a path starting with `/`",
                ));
            }
            Ok(p.to_string())
        };
        let ip = pod_ip.trim();
        if ip.is_empty() {
            return Err(TelemetryError::config(
                format!("{pod} pod IP"),
                "",
                "the pod's IP (the pod has none yet)",
            ));
        }
        let host = if ip.contains(':') && !ip.starts_with('[') {
            format!("[{ip}]")
        } else {
            ip.to_string()
        };
        let base = format!("http://{host}:{port}");
        let metrics_url = format!(
            "{base}{}",
            path_of(ANNOTATION_METRICS_PATH, default_metrics_path(framework))?
        );
        check_url(&field(ANNOTATION_METRICS_PORT), &metrics_url)?;
        let health_url = match annotations.get(ANNOTATION_HEALTH_PATH).map(|s| s.trim()) {
            Some("none") => None,
            Some(_) => Some(format!("{base}{}", path_of(ANNOTATION_HEALTH_PATH, "/")?)),
            None => default_health_path(framework).map(|p| format!("{base}{p}")),
        };
        Ok(Some(EngineTarget {
            pod,
            container: String::new(),
            framework,
            metrics_url,
            health_url,
            model: annotations
                .get(ANNOTATION_MODEL)
                .map(|m| m.trim().to_string())
                .filter(|m| !m.is_empty()),
            timeout: None,
        }))
    }

    /// A target from a flag: `[namespace/pod=]framework=url`, e.g.
    /// `vllm=http://127.0.0.1:8000/metrics` or
    /// `llm/vllm-0=vllm=http://10.0.0.5:8000/metrics`. Without a pod the
    /// engine is named by its address, in namespace
    /// [`STATIC_TARGET_NAMESPACE`]. The health URL is
    /// the framework's default on the same host and port.
    pub fn parse_flag(flag: &str) -> Result<EngineTarget, TelemetryError> {
        let field = "--engine";
        let bad = |allowed: &str| TelemetryError::config(field, flag, allowed.to_string());
        let (first, rest) = flag
            .split_once('=')
            .ok_or_else(|| bad("`[namespace/pod=]framework=http://host:port/path`"))?;
        let (pod, framework_raw, url) = if first.contains('/') {
            let (ns, name) = first.split_once('/').unwrap_or((first, ""));
            if ns.is_empty() || name.is_empty() || name.contains('/') {
                return Err(bad("a pod as `namespace/name` before the first `=`"));
            }
            let (fw, url) = rest
                .split_once('=')
                .ok_or_else(|| bad("`namespace/pod=framework=http://host:port/path`"))?;
            (Some(PodRef::new(ns, name)), fw, url)
        } else {
            (None, first, rest)
        };
        let framework = parse_framework(field, framework_raw)?;
        check_scrapable(field, framework)?;
        let url = url.trim();
        check_url(field, url)?;
        let origin = origin(url).ok_or_else(|| bad("an http:// URL"))?;
        let pod = pod.unwrap_or_else(|| {
            PodRef::new(
                STATIC_TARGET_NAMESPACE,
                origin.trim_start_matches("http://"),
            )
        });
        Ok(EngineTarget {
            pod,
            container: String::new(),
            framework,
            metrics_url: url.to_string(),
            health_url: default_health_path(framework).map(|p| format!("{origin}{p}")),
            model: None,
            timeout: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn annotations_give_a_target_with_framework_defaults() {
        let t = EngineTarget::from_pod_annotations(
            PodRef::new("llm", "vllm-0"),
            "10.1.2.3",
            &ann(&[
                (ANNOTATION_METRICS_PORT, "8000"),
                (ANNOTATION_FRAMEWORK, "vllm"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(t.metrics_url, "http://10.1.2.3:8000/metrics");
        assert_eq!(t.health_url.as_deref(), Some("http://10.1.2.3:8000/health"));
        assert_eq!(t.framework, Framework::Vllm);

        let t = EngineTarget::from_pod_annotations(
            PodRef::new("llm", "trt-0"),
            "fd00::5",
            &ann(&[
                (ANNOTATION_METRICS_PORT, "8000"),
                (ANNOTATION_FRAMEWORK, "trtllm-serve"),
                (ANNOTATION_HEALTH_PATH, "none"),
                (ANNOTATION_MODEL, "llama"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(t.metrics_url, "http://[fd00::5]:8000/prometheus/metrics");
        assert_eq!(t.health_url, None);
        assert_eq!(t.model.as_deref(), Some("llama"));
    }

    #[test]
    fn pods_without_a_metrics_port_are_not_targets() {
        let t = EngineTarget::from_pod_annotations(
            PodRef::new("a", "b"),
            "10.0.0.1",
            &ann(&[(ANNOTATION_FRAMEWORK, "vllm")]),
        )
        .unwrap();
        assert_eq!(t, None);
    }

    #[test]
    fn bad_annotations_name_the_annotation_and_the_value() {
        let err = EngineTarget::from_pod_annotations(
            PodRef::new("llm", "x"),
            "10.0.0.1",
            &ann(&[
                (ANNOTATION_METRICS_PORT, "80a"),
                (ANNOTATION_FRAMEWORK, "vllm"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("llm/x annotation gpuscale.dev/metrics-port"),
            "{err}"
        );
        assert!(err.contains("80a"), "{err}");

        let err = EngineTarget::from_pod_annotations(
            PodRef::new("llm", "x"),
            "10.0.0.1",
            &ann(&[
                (ANNOTATION_METRICS_PORT, "80"),
                (ANNOTATION_FRAMEWORK, "ollama"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("gpuscale.dev/framework"), "{err}");
        assert!(err.contains("ollama"), "{err}");
        assert!(err.contains("vllm, sglang"), "{err}");

        let err = EngineTarget::from_pod_annotations(
            PodRef::new("llm", "x"),
            "10.0.0.1",
            &ann(&[
                (ANNOTATION_METRICS_PORT, "80"),
                (ANNOTATION_FRAMEWORK, "vllm"),
                (ANNOTATION_METRICS_PATH, "metrics"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("gpuscale.dev/metrics-path"), "{err}");
    }

    #[test]
    fn flags_parse_with_and_without_a_pod() {
        let t = EngineTarget::parse_flag("vllm=http://127.0.0.1:8000/metrics").unwrap();
        assert_eq!(
            t.pod,
            PodRef::new(STATIC_TARGET_NAMESPACE, "127.0.0.1:8000")
        );
        assert_eq!(
            t.health_url.as_deref(),
            Some("http://127.0.0.1:8000/health")
        );

        let t = EngineTarget::parse_flag(
            "llm/llama-0=llama-cpp=http://10.0.0.5:8080/metrics?model=qwen",
        )
        .unwrap();
        assert_eq!(t.pod, PodRef::new("llm", "llama-0"));
        assert_eq!(t.framework, Framework::LlamaCpp);
        assert_eq!(t.metrics_url, "http://10.0.0.5:8080/metrics?model=qwen");
    }

    #[test]
    fn bad_flags_are_rejected_with_the_flag_named() {
        for flag in [
            "vllm",
            "vllm=https://10.0.0.1/metrics",
            "foo=http://10.0.0.1/metrics",
            "push=http://10.0.0.1/metrics",
            "llm/=vllm=http://10.0.0.1/metrics",
            "vllm=not a url",
        ] {
            let err = EngineTarget::parse_flag(flag).unwrap_err().to_string();
            assert!(err.contains("--engine"), "{flag}: {err}");
        }
    }
}
