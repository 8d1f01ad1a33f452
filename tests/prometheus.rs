//! A real Prometheus against a live scaler and agents: every PromQL
//! expression of the Grafana dashboards (`deploy/grafana/*.json`) and of the
//! alert rules (`deploy/prometheus/rules.yaml`) must find data, so no
//! typo'd metric or label can ship.
//!
//! The test starts a scaler (a policy workload with latency objectives and
//! a forecast, and a proportional one) and two agents over simulated nodes
//! with engines under a varying load, all in this process on loopback; it
//! sends one malformed agent report (so the rejection counter exists);
//! writes a `prometheus.yml` scraping everything every second (with the
//! rules file loaded); starts `prometheus` as a child process (killed on
//! drop); and then, until every check passes or a deadline:
//!
//! * each dashboard panel query (template variables substituted: `.*` for
//!   `$namespace`/`$workload`/`$hostname`, `10s` for `$__rate_interval`, `1m`
//!   for `$__range`) returns a non-empty result;
//! * each variable's `label_values(selector, label)` selector returns series
//!   carrying the label;
//! * each alert and annotation expression is valid PromQL, and each metric
//!   selector inside it returns data (the whole expression may rightly be
//!   empty when nothing fires, but a typo'd selector never has data);
//! * Prometheus loaded every rule without error.
//!
//! Also `promtool check rules` on the rules file, and the PrometheusRule in
//! `deploy/base/` must carry exactly the rules file's groups.
//!
//! `prometheus` and `promtool` must be on PATH (`./scripts/test.sh` installs
//! Debian's `prometheus`); without them the test fails and says so.
//!
//! With `GPUSCALE_RENDER_PANELS=DIR` it also renders three workload-dashboard
//! panels from Prometheus' range API as SVG charts into DIR (the README's
//! pictures); `GPUSCALE_RENDER_SECONDS` sets how long to record first.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gpuscale_agent::node::{NodeConfig, RunningNode, start_node};
use gpuscale_agent::{AgentConfig, BackoffConfig};
use gpuscale_policy::PredictiveMode;
use gpuscale_scaler::config::DeciderConfig;
use gpuscale_scaler::{RunningScaler, Scaler, ScalerConfig, ScalerFile};
use gpuscale_telemetry::fake::{
    FakeEngineConfig, FakeGpuGroup, FakeLoadCurve, FakeLoadPoint, FakeNodeConfig,
};
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const RULES: &str = "deploy/prometheus/rules.yaml";
const PROMETHEUS_RULE: &str = "deploy/base/prometheusrule.yaml";
/// How long the checks may take to pass once Prometheus runs.
const DEADLINE: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------
// Expressions in the dashboards and the rules.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A panel query: the whole expression must return data.
    Panel,
    /// An alert or annotation: valid, and each selector returns data.
    Condition,
    /// `label_values(selector, label)`: the selector returns series with the label.
    Variable,
}

#[derive(Debug, Clone)]
struct Expr {
    /// Where it comes from, for messages.
    at: String,
    kind: Kind,
    /// With template variables substituted.
    promql: String,
    /// For variables: the label.
    label: Option<String>,
}

fn dashboards() -> Vec<(String, Value)> {
    let dir = Path::new(ROOT).join("deploy/grafana");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("dashboard readable");
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.display()));
            (
                p.file_name().expect("name").to_string_lossy().into_owned(),
                v,
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(
        out.len() >= 3,
        "three dashboards expected, found {}",
        out.len()
    );
    out
}

/// Grafana's template variables, as the test evaluates them.
fn substitute(expr: &str) -> String {
    let mut s = expr.to_string();
    for (var, value) in [
        ("${__rate_interval}", "10s"),
        ("$__rate_interval", "10s"),
        ("${__interval}", "5s"),
        ("$__interval", "5s"),
        ("${__range}", "1m"),
        ("$__range", "1m"),
        ("${namespace}", ".*"),
        ("$namespace", ".*"),
        ("${workload}", ".*"),
        ("$workload", ".*"),
        ("${hostname}", ".*"),
        ("$hostname", ".*"),
    ] {
        s = s.replace(var, value);
    }
    assert!(
        !s.contains('$'),
        "an unknown template variable is left in `{expr}`"
    );
    s
}

fn panels_of(v: &Value, out: &mut Vec<Value>) {
    if let Some(panels) = v.get("panels").and_then(Value::as_array) {
        for p in panels {
            out.push(p.clone());
            panels_of(p, out);
        }
    }
}

fn dashboard_exprs() -> Vec<Expr> {
    let mut exprs = Vec::new();
    for (file, d) in dashboards() {
        let mut panels = Vec::new();
        panels_of(&d, &mut panels);
        for p in &panels {
            let title = p["title"].as_str().unwrap_or("?");
            for t in p["targets"].as_array().into_iter().flatten() {
                let Some(e) = t["expr"].as_str() else {
                    continue;
                };
                exprs.push(Expr {
                    at: format!("{file}: panel `{title}` {}", t["refId"]),
                    kind: Kind::Panel,
                    promql: substitute(e),
                    label: None,
                });
            }
        }
        for a in d["annotations"]["list"].as_array().into_iter().flatten() {
            if let Some(e) = a["expr"].as_str() {
                exprs.push(Expr {
                    at: format!("{file}: annotation `{}`", a["name"]),
                    kind: Kind::Condition,
                    promql: substitute(e),
                    label: None,
                });
            }
        }
        for v in d["templating"]["list"].as_array().into_iter().flatten() {
            if v["type"] != "query" {
                continue;
            }
            let q = v["query"]["query"]
                .as_str()
                .or_else(|| v["definition"].as_str())
                .expect("a query variable has a query");
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.strip_suffix(')'))
                .unwrap_or_else(|| {
                    panic!(
                        "{file}: variable query `{q}`: only label_values(selector, label) is used"
                    )
                });
            let (selector, label) = inner
                .rsplit_once(',')
                .expect("label_values(selector, label)");
            exprs.push(Expr {
                at: format!("{file}: variable `{}`", v["name"]),
                kind: Kind::Variable,
                promql: substitute(selector.trim()),
                label: Some(label.trim().to_string()),
            });
        }
    }
    exprs
}

fn yaml(path: &str) -> serde_yaml::Value {
    let text = std::fs::read_to_string(Path::new(ROOT).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn rule_exprs() -> Vec<Expr> {
    let rules = yaml(RULES);
    let mut out = Vec::new();
    for g in rules["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            let name = r["alert"]
                .as_str()
                .or_else(|| r["record"].as_str())
                .expect("alert or record");
            out.push(Expr {
                at: format!("{RULES}: {name}"),
                kind: Kind::Condition,
                promql: r["expr"].as_str().expect("expr").to_string(),
                label: None,
            });
        }
    }
    out
}

/// The metric selectors in a PromQL expression: each metric name with its
/// `{...}` matchers. Function names, keywords, label lists of `by`/`on`/...,
/// durations, numbers and strings are not selectors.
fn selectors(expr: &str) -> Vec<String> {
    // Keywords, and aggregation operators (`sum by (x) (...)`: not
    // always directly followed by their parenthesis).
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "inf",
        "nan",
        "atan2",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    const GROUPING: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let skip_string = |i: usize| -> usize {
        let q = b[i];
        let mut j = i + 1;
        while j < b.len() && b[j] != q {
            if b[j] == b'\\' {
                j += 1;
            }
            j += 1;
        }
        j + 1
    };
    let skip_to_close = |i: usize, open: u8, close: u8| -> usize {
        let mut depth = 0;
        let mut j = i;
        while j < b.len() {
            match b[j] {
                b'"' | b'\'' | b'`' => {
                    j = skip_string(j);
                    continue;
                }
                c if c == open => depth += 1,
                c if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        return j + 1;
                    }
                }
                _ => {}
            }
            j += 1;
        }
        j
    };
    while i < b.len() {
        let c = b[i];
        if c == b'"' || c == b'\'' || c == b'`' {
            i = skip_string(i);
        } else if c == b'[' {
            i = skip_to_close(i, b'[', b']');
        } else if c == b'{' {
            // Matchers without a metric name.
            i = skip_to_close(i, b'{', b'}');
        } else if c.is_ascii_digit() || c == b'.' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == b'_' || c == b':' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
                i += 1;
            }
            let word = &expr[start..i];
            let mut j = i;
            while j < b.len() && b[j].is_ascii_whitespace() {
                j += 1;
            }
            let lower = word.to_ascii_lowercase();
            if GROUPING.contains(&lower.as_str()) {
                if j < b.len() && b[j] == b'(' {
                    i = skip_to_close(j, b'(', b')');
                }
            } else if KEYWORDS.contains(&lower.as_str()) {
            } else if j < b.len() && b[j] == b'(' {
                // A function.
            } else if j < b.len() && b[j] == b'{' {
                let end = skip_to_close(j, b'{', b'}');
                out.push(format!("{word}{}", &expr[j..end]));
                i = end;
            } else {
                out.push(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn selectors_are_found_and_nothing_else() {
    let e = r#"(gpuscale_scaler_desired_replicas >= on (namespace, workload) gpuscale_scaler_max_replicas)
      and on (namespace, workload) (gpuscale_scaler_slo_status{status="breached"} == 1)
      or absent(up{job=~".*agent.*"}) unless sum by (le) (rate(x_bucket{a="{b}"}[5m])) > bool 0.5e3"#;
    assert_eq!(
        selectors(e),
        [
            "gpuscale_scaler_desired_replicas",
            "gpuscale_scaler_max_replicas",
            r#"gpuscale_scaler_slo_status{status="breached"}"#,
            r#"up{job=~".*agent.*"}"#,
            r#"x_bucket{a="{b}"}"#,
        ]
    );
}

#[test]
fn the_prometheus_rule_carries_exactly_the_rules_file() {
    let rules = yaml(RULES);
    let rule = yaml(PROMETHEUS_RULE);
    assert_eq!(rule["kind"], "PrometheusRule");
    assert_eq!(
        rule["spec"]["groups"], rules["groups"],
        "{PROMETHEUS_RULE} differs from {RULES} (the source): copy the groups over"
    );
}

#[test]
fn dashboards_have_the_variables_and_schema_grafana_needs() {
    for (file, d) in dashboards() {
        assert!(d["schemaVersion"].as_u64().unwrap_or(0) >= 39, "{file}");
        let vars: BTreeMap<String, Value> = d["templating"]["list"]
            .as_array()
            .expect("templating")
            .iter()
            .map(|v| (v["name"].as_str().unwrap_or("").to_string(), v.clone()))
            .collect();
        assert_eq!(vars["datasource"]["type"], "datasource", "{file}");
        assert_eq!(vars["datasource"]["query"], "prometheus", "{file}");
        assert!(
            vars.contains_key("namespace"),
            "{file}: a namespace variable"
        );
        if file == "workload.json" {
            assert!(vars.contains_key("workload"), "{file}: a workload variable");
        }
        let mut panels = Vec::new();
        panels_of(&d, &mut panels);
        for p in panels.iter().filter(|p| p["type"] != "row") {
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "{file}: panel {} uses the datasource variable",
                p["title"]
            );
        }
        let uid = d["uid"].as_str().unwrap_or("");
        assert!(uid.starts_with("gpuscale-"), "{file}: uid {uid}");
    }
}

// ---------------------------------------------------------------------------
// Prometheus as a child process, and its HTTP API.

fn tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "`{name}` is not on PATH: this test runs a real Prometheus. Install Debian's \
             `prometheus` package (`apt-get install prometheus`; ./scripts/test.sh does it)"
        )
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One HTTP/1.0 GET (no chunking, the server closes): status and body.
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP header")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no HTTP status")?;
    Ok((status, body.to_string()))
}

struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(scaler: SocketAddr, agents: &[SocketAddr]) -> Self {
        let binary = tool("prometheus");
        let dir = tempfile::tempdir().expect("temp dir");
        let agents: Vec<String> = agents.iter().map(|a| format!("'{a}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - '{rules}'\n\
             scrape_configs:\n\
             \x20 - job_name: gpuscale-scaler\n    static_configs:\n      - targets: ['{scaler}']\n\
             \x20 - job_name: gpuscale-agent\n    static_configs:\n      - targets: [{agents}]\n",
            rules = Path::new(ROOT).join(RULES).display(),
            agents = agents.join(", "),
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("config written");
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        let p = Self {
            child,
            addr,
            _dir: dir,
        };
        let started = Instant::now();
        loop {
            if let Ok((200, _)) = http_get(addr, "/-/ready") {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "Prometheus did not become ready: {}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    fn api(&self, path: &str) -> Result<Value, String> {
        let (status, body) = http_get(self.addr, path)?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if status != 200 || v["status"] != "success" {
            return Err(format!(
                "HTTP {status}: {} {}",
                v["errorType"].as_str().unwrap_or(""),
                v["error"].as_str().unwrap_or(&body)
            ));
        }
        Ok(v["data"].clone())
    }

    /// An instant query's result vector (or scalar as one element).
    fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let data = self.api(&format!("/api/v1/query?query={}", urlencode(promql)))?;
        match data["resultType"].as_str() {
            Some("vector") | Some("matrix") => {
                Ok(data["result"].as_array().cloned().unwrap_or_default())
            }
            _ => Ok(vec![data["result"].clone()]),
        }
    }

    fn query_range(
        &self,
        promql: &str,
        start: f64,
        end: f64,
        step: f64,
    ) -> Result<Vec<Value>, String> {
        let data = self.api(&format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step={step}",
            urlencode(promql)
        ))?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }
}

/// What is wrong with one expression now, if anything.
fn check(p: &Prometheus, e: &Expr) -> Option<String> {
    let result = match p.query(&e.promql) {
        Ok(r) => r,
        Err(err) => return Some(format!("{}: `{}` fails: {err}", e.at, e.promql)),
    };
    match e.kind {
        Kind::Panel => result
            .is_empty()
            .then(|| format!("{}: `{}` returns no data", e.at, e.promql)),
        Kind::Variable => {
            let label = e.label.as_deref().unwrap_or("");
            let has = result
                .iter()
                .any(|s| s["metric"][label].as_str().is_some_and(|v| !v.is_empty()));
            (!has).then(|| {
                format!(
                    "{}: `{}` has no series with label `{label}`",
                    e.at, e.promql
                )
            })
        }
        Kind::Condition => {
            let found = selectors(&e.promql);
            if found.is_empty() {
                return Some(format!("{}: `{}` has no metric selector", e.at, e.promql));
            }
            found.into_iter().find_map(|s| match p.query(&s) {
                Ok(r) if !r.is_empty() => None,
                Ok(_) => Some(format!("{}: selector `{s}` returns no data", e.at)),
                Err(err) => Some(format!("{}: selector `{s}` fails: {err}", e.at)),
            })
        }
    }
}

// ---------------------------------------------------------------------------
// The live scaler and agents.

const SCALER_CONFIG: &str = r#"
tick: 500ms
window: 20s
workloads:
  - name: chat
    namespace: llm
    labels: {app: chat, tier: prod}
    engines: {model: llama-3-8b}
    policy:
      target: {name: chat}
      minReplicas: 1
      maxReplicas: 6
      coldStartSeconds: 30
      performanceModel: {preset: h200-llama3-8b-bf16}
      slo:
        ttft: {thresholdSeconds: 0.3, percentile: 90}
        itl: {thresholdSeconds: 0.05, percentile: 90}
  - name: batch
    namespace: llm
    labels: {app: batch, tier: dev}
    engines: {model: mistral-7b}
    proportional: {capacityTokensPerSecond: 2000, maxReplicas: 4}
"#;

fn engine(pod: &str, model: &str, warmup_seconds: f64) -> FakeEngineConfig {
    FakeEngineConfig {
        pod: pod.into(),
        namespace: "llm".into(),
        model: model.into(),
        gpus: 1,
        capacity_tokens_per_second: 2_800.0,
        batch_limit: 56,
        mean_input_tokens: 512.0,
        mean_output_tokens: 200.0,
        kv_capacity_tokens: 400_000.0,
        warmup_seconds,
    }
}

fn node(seed: u64, engines: Vec<FakeEngineConfig>) -> FakeNodeConfig {
    FakeNodeConfig {
        seed,
        gpus: vec![FakeGpuGroup {
            model: "NVIDIA H200".into(),
            count: 4,
            memory_gib: 141.0,
            power_limit_watts: 700.0,
            gpm_supported: true,
        }],
        engines,
        // Every minute a peak that the node's engines cannot quite serve:
        // queues build, TTFT rises over the objective, then drains.
        load: FakeLoadCurve {
            points: [
                (0.0, 5.0),
                (10.0, 5.0),
                (20.0, 32.0),
                (35.0, 32.0),
                (45.0, 5.0),
                (60.0, 5.0),
            ]
            .iter()
            .map(|(t, r)| FakeLoadPoint {
                at_seconds: *t,
                requests_per_second: *r,
            })
            .collect(),
            noise: 0.1,
            repeat: true,
        },
    }
}

struct Fleet {
    scaler: RunningScaler,
    agents: Vec<RunningNode>,
}

async fn start_fleet() -> Fleet {
    let file: ScalerFile = serde_yaml::from_str(SCALER_CONFIG).expect("scaler config parses");
    let mut config = ScalerConfig::new("127.0.0.1:0".parse().expect("addr"));
    config.metrics_addr = Some("127.0.0.1:0".parse().expect("addr"));
    file.apply(&mut config, Path::new(ROOT))
        .expect("valid workloads");
    for w in &mut config.workloads {
        // A forecast within seconds instead of after a day of history.
        if let DeciderConfig::Policy { config, .. } = &mut w.decider {
            config.predictive.mode = PredictiveMode::ForecastOnly;
            config.predictive.bucket_s = 2.0;
            config.predictive.min_history_s = 6.0;
        }
    }
    let scaler = Scaler::new(config).start().await.expect("scaler starts");
    let url = format!("http://{}", scaler.grpc_addr());
    let mut agents = Vec::new();
    for (name, seed, engines) in [
        (
            "gpu-node-a",
            1,
            vec![
                engine("chat-0", "llama-3-8b", 0.0),
                engine("chat-1", "llama-3-8b", 3.0),
            ],
        ),
        (
            "gpu-node-b",
            2,
            vec![
                engine("chat-2", "llama-3-8b", 0.0),
                engine("batch-0", "mistral-7b", 0.0),
            ],
        ),
    ] {
        let mut c = AgentConfig::new(&url, name);
        c.sample_interval = Duration::from_millis(250);
        c.metrics_addr = Some("127.0.0.1:0".parse().expect("addr"));
        c.backoff = BackoffConfig {
            base: Duration::from_millis(50),
            cap: Duration::from_millis(500),
            jitter: 0.5,
        };
        agents.push(
            start_node(c, NodeConfig::fake(node(seed, engines)), None)
                .await
                .expect("agent starts"),
        );
    }
    // One malformed report, as a broken agent would send: the scaler ends
    // that stream and counts the rejection.
    let mut client = gpuscale_proto::v1::agent_service_client::AgentServiceClient::connect(url)
        .await
        .expect("connects");
    let rejected = client
        .report(tokio_stream::iter([
            gpuscale_proto::v1::NodeReport::default(),
        ]))
        .await
        .map(|r| r.into_inner());
    match rejected {
        Err(status) => assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}"),
        Ok(mut stream) => {
            let status = stream.message().await.expect_err("the stream is ended");
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        }
    }
    Fleet { scaler, agents }
}

/// Runs the async fleet on its own runtime thread while the test's thread
/// talks to Prometheus with blocking I/O.
fn with_fleet(body: impl FnOnce(SocketAddr, Vec<SocketAddr>)) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let fleet = runtime.block_on(start_fleet());
    let scaler = fleet.scaler.http_addr().expect("scaler metrics address");
    let agents: Vec<SocketAddr> = fleet
        .agents
        .iter()
        .map(|a| a.metrics_addr().expect("agent metrics address"))
        .collect();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(scaler, agents)));
    runtime.block_on(async {
        for a in fleet.agents {
            let _ = a.shutdown().await;
        }
        let _ = fleet.scaler.shutdown().await;
    });
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn every_dashboard_and_alert_expression_finds_data_in_a_real_prometheus() {
    let promtool = tool("promtool");
    let checked = Command::new(promtool)
        .arg("check")
        .arg("rules")
        .arg(Path::new(ROOT).join(RULES))
        .output()
        .expect("promtool runs");
    assert!(
        checked.status.success(),
        "promtool check rules {RULES}:\n{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let mut exprs = dashboard_exprs();
    exprs.extend(rule_exprs());
    assert!(exprs.len() > 40, "only {} expressions found", exprs.len());

    with_fleet(|scaler, agents| {
        let prometheus = Prometheus::start(scaler, &agents);
        let started = Instant::now();
        let mut failures: Vec<String>;
        loop {
            failures = exprs.iter().filter_map(|e| check(&prometheus, e)).collect();
            if let Err(e) = rules_loaded(&prometheus) {
                failures.push(e);
            }
            if failures.is_empty() || started.elapsed() > DEADLINE {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        assert!(
            failures.is_empty(),
            "after {:.0} s, {} of {} expressions fail:\n{}\nPrometheus log:\n{}",
            started.elapsed().as_secs_f64(),
            failures.len(),
            exprs.len(),
            failures.join("\n"),
            prometheus.log()
        );
        eprintln!(
            "all {} expressions have data after {:.1} s of scraping",
            exprs.len(),
            started.elapsed().as_secs_f64()
        );
        if let Some(dir) = std::env::var_os("GPUSCALE_RENDER_PANELS") {
            let seconds: u64 = std::env::var("GPUSCALE_RENDER_SECONDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(120);
            let elapsed = started.elapsed().as_secs();
            if seconds > elapsed {
                std::thread::sleep(Duration::from_secs(seconds - elapsed));
            }
            render_panels(&prometheus, Path::new(&dir), seconds as f64);
        }
    });
}

fn rules_loaded(p: &Prometheus) -> Result<(), String> {
    let data = p.api("/api/v1/rules")?;
    let groups = data["groups"].as_array().cloned().unwrap_or_default();
    let expected = rule_exprs().len();
    let mut loaded = 0;
    for g in &groups {
        for r in g["rules"].as_array().into_iter().flatten() {
            loaded += 1;
            if r["health"] == "err" {
                return Err(format!(
                    "rule {} does not evaluate: {}",
                    r["name"], r["lastError"]
                ));
            }
        }
    }
    if loaded != expected {
        return Err(format!(
            "Prometheus loaded {loaded} rules, the file has {expected}"
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The README's pictures: panels rendered from the range API as SVG.

fn render_panels(p: &Prometheus, dir: &Path, seconds: f64) {
    std::fs::create_dir_all(dir).expect("output directory");
    let (_, workload) = dashboards()
        .into_iter()
        .find(|(f, _)| f == "workload.json")
        .expect("workload dashboard");
    let mut panels = Vec::new();
    panels_of(&workload, &mut panels);
    let end = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let start = end - seconds;
    for (title, file, unit) in [
        (
            "Arrival rate: actual vs forecast",
            "dashboard-workload-arrival.svg",
            "",
        ),
        (
            "Time to first token vs SLO",
            "dashboard-workload-ttft.svg",
            "s",
        ),
        (
            "Replicas: desired, current, ready, in flight",
            "dashboard-workload-replicas.svg",
            "",
        ),
    ] {
        let panel = panels
            .iter()
            .find(|p| p["title"] == title)
            .unwrap_or_else(|| panic!("panel `{title}`"));
        let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        for t in panel["targets"].as_array().expect("targets") {
            let promql = substitute(t["expr"].as_str().expect("expr"))
                .replace("workload=~\".*\"", "workload=~\"chat\"");
            let legend = t["legendFormat"].as_str().unwrap_or("");
            for s in p
                .query_range(&promql, start, end, 1.0)
                .expect("range query")
            {
                let name = legend_of(legend, &s["metric"]);
                let points: Vec<(f64, f64)> = s["values"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| {
                        let t = v[0].as_f64()?;
                        let y: f64 = v[1].as_str()?.parse().ok()?;
                        y.is_finite().then_some((t - start, y))
                    })
                    .collect();
                if !points.is_empty() {
                    series.push((name, points));
                }
            }
        }
        let svg = svg_chart(title, &series, seconds, unit);
        let path = dir.join(file);
        std::fs::write(&path, svg).expect("svg written");
        eprintln!("wrote {}", path.display());
    }
}

fn legend_of(format: &str, metric: &Value) -> String {
    let mut out = format.to_string();
    while let Some(open) = out.find("{{") {
        let Some(close) = out[open..].find("}}") else {
            break;
        };
        let key = out[open + 2..open + close].trim().to_string();
        let value = metric[&key].as_str().unwrap_or("").to_string();
        out.replace_range(open..open + close + 2, &value);
    }
    out
}

fn svg_chart(
    title: &str,
    series: &[(String, Vec<(f64, f64)>)],
    seconds: f64,
    unit: &str,
) -> String {
    const W: f64 = 760.0;
    const H: f64 = 300.0;
    const LEFT: f64 = 60.0;
    const RIGHT: f64 = 180.0;
    const TOP: f64 = 36.0;
    const BOTTOM: f64 = 36.0;
    const COLORS: [&str; 8] = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    ];
    let ymax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(0.0_f64, f64::max);
    let ymax = nice_ceiling(ymax.max(1e-9) * 1.1);
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let x = |t: f64| LEFT + t / seconds * pw;
    let y = |v: f64| TOP + ph - v / ymax * ph;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"{W}\" height=\"{H}\" fill=\"#ffffff\"/>\n\
         <text x=\"{LEFT}\" y=\"20\" font-size=\"14\" font-weight=\"bold\">{}</text>\n",
        escape(title)
    );
    for i in 0..=4 {
        let v = ymax * f64::from(i) / 4.0;
        let yy = y(v);
        s.push_str(&format!(
            "<line x1=\"{LEFT}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\" stroke=\"#e0e0e0\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            LEFT + pw,
            LEFT - 6.0,
            yy + 4.0,
            format_value(v, unit)
        ));
    }
    let step = (seconds / 6.0).max(1.0).round();
    let mut t = 0.0;
    while t <= seconds + 0.01 {
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{:.0} s</text>\n",
            x(t),
            H - BOTTOM + 16.0,
            t
        ));
        t += step;
    }
    s.push_str(&format!(
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{pw:.1}\" height=\"{ph:.1}\" fill=\"none\" stroke=\"#999999\"/>\n"
    ));
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let dashed = name.contains("objective")
            || name.contains("forecast")
            || name.ends_with(" max")
            || name.ends_with(" min");
        let path: Vec<String> = points
            .iter()
            .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
            .collect();
        s.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.6\"{} points=\"{}\"/>\n",
            if dashed {
                " stroke-dasharray=\"6 4\""
            } else {
                ""
            },
            path.join(" ")
        ));
        let ly = TOP + 8.0 + 16.0 * i as f64;
        s.push_str(&format!(
            "<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{color}\" stroke-width=\"2\"{}/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
            LEFT + pw + 10.0,
            LEFT + pw + 30.0,
            if dashed { " stroke-dasharray=\"6 4\"" } else { "" },
            LEFT + pw + 36.0,
            ly + 4.0,
            escape(name)
        ));
    }
    s.push_str("</svg>\n");
    s
}

fn nice_ceiling(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

fn format_value(v: f64, unit: &str) -> String {
    // Axis ticks are quarters of a "nice" maximum: two decimals at most.
    let short = |v: f64| {
        let s = format!("{v:.2}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        if s.is_empty() {
            "0".to_string()
        } else {
            s.to_string()
        }
    };
    match unit {
        "s" if v < 1.0 && v > 0.0 => format!("{:.0} ms", v * 1000.0),
        "s" => format!("{} s", short(v)),
        _ => short(v),
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
