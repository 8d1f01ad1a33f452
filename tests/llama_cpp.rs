//! The real agent against a real inference engine: llama.cpp's
//! `llama-server` (built by `scripts/llama-server.sh`, a tiny random-weight
//! model written at test time) on the CPU, the `gpuscale agent` binary
//! scraping it and warming it up, the readiness gate written through the
//! fake Kubernetes API server, and the real scaler receiving the stream.
//!
//! The test drives concurrent completions and checks what the agent reports
//! against what it sent and the server's own counters, then kills and
//! restarts the server (its counters start again from zero): the agent's
//! totals stay monotonic, the scaler's token rate does not spike, and the
//! gate drops and returns.
//!
//! Nothing here skips: without the binary (no compiler, no CMake and no pip)
//! the helper fails with the reason. Run alone:
//! `cargo nextest run --test llama_cpp` (or `cargo test --test llama_cpp`).

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use gpuscale_core::PodRef;
use gpuscale_fake_apiserver::{FakeApiServer, FakeApiServerConfig, FakeApiServerHandle};
use gpuscale_scaler::{Scaler, ScalerConfig};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::{Value, json};
use support::llama_server::{self, LlamaServer, LlamaServerOptions, free_port, server_metric};

const GATE: &str = "gpuscale.dev/engine-warm";
const SLOTS: u32 = 4;

/// Polls `f` every 100 ms until it holds; a liveness bound, not a timing
/// assertion. On timeout the agent's log tail is shown.
async fn eventually<T>(
    what: &str,
    limit: Duration,
    log: &dyn Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}\n--- the agent's log ---\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One non-streaming completion of exactly `tokens` tokens (EOS ignored):
/// the tokens the server says it generated.
fn complete(addr: SocketAddr, tokens: u32) -> u64 {
    let body = json!({"prompt": "Once upon a time", "max_tokens": tokens, "ignore_eos": true,
        "temperature": 0.0})
    .to_string();
    let mut s = TcpStream::connect(addr).expect("connect to llama-server");
    s.set_read_timeout(Some(Duration::from_secs(300)))
        .expect("timeout");
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
    let v: Value = serde_json::from_str(body.trim()).expect("a JSON completion");
    v["usage"]["completion_tokens"]
        .as_u64()
        .expect("usage.completion_tokens")
}

/// The agent's own series for the engine's pod: `name{...pod="llama-0"...}`.
fn agent_metric(addr: SocketAddr, name: &str, extra: &str) -> Option<f64> {
    let (status, body) = llama_server::http_get(addr, "/metrics").ok()?;
    if status != 200 {
        return None;
    }
    body.lines()
        .find(|l| {
            l.starts_with(&format!("{name}{{"))
                && l.contains("pod=\"llama-0\"")
                && l.contains(extra)
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn gate(server: &FakeApiServerHandle) -> (Option<String>, Option<String>) {
    let pod = server
        .object("", "pods", "default", "llama-0")
        .expect("the pod");
    let c = pod["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == GATE).cloned());
    let field = |k: &str| c.as_ref().and_then(|c| c[k].as_str()).map(str::to_string);
    (field("status"), field("reason"))
}

/// The scaler's token rate for the engine, with the seconds it covers.
fn scaler_rate(view: &gpuscale_scaler::StateView) -> Option<(f64, f64)> {
    let pod = PodRef::new("default", "llama-0");
    view.engines().find(|e| e.sample.pod == pod).and_then(|e| {
        e.window
            .generation_tokens_per_second
            .map(|r| (r, e.window.covered_seconds))
    })
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reads_a_real_llama_cpp_server_through_load_and_a_restart() {
    let binary = llama_server::binary();
    let dir = tempfile::tempdir().expect("tempdir");
    let model = llama_server::tiny_model(dir.path());
    let options = LlamaServerOptions {
        slots: SLOTS,
        context: 4096 * SLOTS,
        ..LlamaServerOptions::default()
    };
    let mut engine = LlamaServer::start(&binary, &model, &options, &dir.path().join("llama-1.log"));
    let engine_addr = engine.addr();

    // The cluster: one node, the engine's pod declaring the readiness gate.
    let api = FakeApiServer::start(FakeApiServerConfig {
        nodes: vec!["node-a".into()],
        pod_start_delay: Duration::from_millis(50),
        ..FakeApiServerConfig::default()
    })
    .await
    .expect("fake API server");
    let client = api.client().expect("client");
    let pod: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "llama-0"},
        "spec": {"containers": [{"name": "server", "image": "llama.cpp:server"}],
                 "readinessGates": [{"conditionType": GATE}]}
    }))
    .expect("pod");
    let pods = ApiResource::from_gvk(&GroupVersionKind::gvk("", "v1", "Pod"));
    Api::<DynamicObject>::namespaced_with(client, "default", &pods)
        .create(&PostParams::default(), &pod)
        .await
        .expect("created");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: \"{}\"}}}}]\n\
             users: [{{name: fake, user: {{}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: default}}}}]\n",
            api.url()
        ),
    )
    .expect("kubeconfig");

    let scaler = Scaler::new(ScalerConfig::new("127.0.0.1:0".parse().expect("addr")))
        .start()
        .await
        .expect("scaler starts");
    let view = scaler.view();

    // The real agent binary.
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let agent_log = dir.path().join("agent.log");
    let log = std::fs::File::create(&agent_log).expect("log");
    let _agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_gpuscale"))
            .args(["agent", "--node-name", "node-a", "--interval", "250ms"])
            .args(["--scaler", &format!("http://{}", scaler.grpc_addr())])
            // The test's scaler is in-process and plaintext.
            .arg("--insecure-plaintext")
            .args(["--metrics-addr", &metrics_addr.to_string()])
            .args(["--kubernetes", "auto", "--pod-resources-socket", "off"])
            .args([
                "--nvml-library",
                &dir.path().join("none.so").to_string_lossy(),
            ])
            .args([
                "--engine",
                &format!("default/llama-0=llama-cpp=http://{engine_addr}/metrics"),
            ])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("NODE_NAME")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start gpuscale agent"),
    );
    let agent_log_tail = || {
        let text = std::fs::read_to_string(&agent_log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };

    // Scraped, warmed up with a real completion, the gate True.
    let long = Duration::from_secs(120);
    eventually(
        "the gate to turn True after the warm-up",
        long,
        &agent_log_tail,
        || (gate(&api) == (Some("True".into()), Some("EngineWarm".into()))).then_some(()),
    )
    .await;
    let warmup_tokens = server_metric(engine_addr, "tokens_predicted_total").expect("counter");
    assert!(
        warmup_tokens >= 1.0,
        "the warm-up was a real completion: {warmup_tokens}"
    );

    // Six concurrent long completions on four slots: four running, two
    // waiting, as the agent reports them.
    let sent = 6;
    // The model was trained (so to speak) for 2,048 positions: within one slot.
    let tokens_each = 2_000;
    let requests: Vec<_> = (0..sent)
        .map(|_| tokio::task::spawn_blocking(move || complete(engine_addr, tokens_each)))
        .collect();
    let (running, waiting) = eventually(
        "the agent to see 4 running and 2 waiting",
        long,
        &agent_log_tail,
        || {
            let r = agent_metric(metrics_addr, "gpuscale_agent_engine_requests_running", "")?;
            let w = agent_metric(metrics_addr, "gpuscale_agent_engine_requests_waiting", "")?;
            (r == f64::from(SLOTS) && w == f64::from(sent - SLOTS)).then_some((r, w))
        },
    )
    .await;
    assert_eq!((running, waiting), (4.0, 2.0));
    let mut generated = 0u64;
    for r in requests {
        generated += r.await.expect("a completion");
    }
    assert_eq!(generated, u64::from(sent * tokens_each));

    // The agent's total is the server's own counter, which holds exactly
    // what the test asked for and the warm-up.
    let server_total = server_metric(engine_addr, "tokens_predicted_total").expect("counter");
    assert_eq!(server_total, warmup_tokens + generated as f64);
    eventually(
        "the agent's total to reach the server's",
        long,
        &agent_log_tail,
        || {
            (agent_metric(
                metrics_addr,
                "gpuscale_agent_engine_generation_tokens_total",
                "",
            ) == Some(server_total))
            .then_some(())
        },
    )
    .await;
    // The scaler's rate: positive, and never more than was generated in
    // the window it covers.
    let (rate, covered) = eventually("the scaler's token rate", long, &agent_log_tail, || {
        scaler_rate(&view.borrow()).filter(|(r, _)| *r > 0.0)
    })
    .await;
    assert!(
        rate * covered <= server_total + 1.0,
        "{rate} tokens/s over {covered} s > {server_total} generated"
    );
    let mut highest_before = rate;
    for _ in 0..10 {
        if let Some((r, _)) = scaler_rate(&view.borrow()) {
            highest_before = highest_before.max(r);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total_before = server_total;

    // Kill the server: the engine fails and the gate drops.
    engine.kill();
    eventually("the gate to turn False", long, &agent_log_tail, || {
        (gate(&api).0 == Some("False".into())).then_some(())
    })
    .await;

    // Restart it on the same port: counters from zero, a new warm-up, the
    // gate True again.
    let mut engine = LlamaServer::start(
        &binary,
        &model,
        &LlamaServerOptions {
            port: engine_addr.port(),
            ..options.clone()
        },
        &dir.path().join("llama-2.log"),
    );
    eventually("the gate to turn True again", long, &agent_log_tail, || {
        (gate(&api) == (Some("True".into()), Some("EngineWarm".into()))).then_some(())
    })
    .await;
    let after: u64 = (0..2).map(|_| complete(engine_addr, 100)).sum();
    assert_eq!(after, 200);
    let server_after = server_metric(engine_addr, "tokens_predicted_total").expect("counter");
    assert!(
        server_after < total_before,
        "the restarted server counts from zero: {server_after}"
    );
    // Totals continue from where they were; the reset is counted.
    eventually(
        "the agent's total to continue across the restart",
        long,
        &agent_log_tail,
        || {
            (agent_metric(
                metrics_addr,
                "gpuscale_agent_engine_generation_tokens_total",
                "",
            ) == Some(total_before + server_after))
            .then_some(())
        },
    )
    .await;
    assert!(
        agent_metric(
            metrics_addr,
            "gpuscale_agent_engine_counter_resets_total",
            ""
        )
        .is_some_and(|n| n >= 1.0),
        "{}",
        agent_log_tail()
    );
    // The scaler's rate never spiked: never above what the load reached,
    // never more than was generated.
    for _ in 0..20 {
        if let Some((r, covered)) = scaler_rate(&view.borrow()) {
            assert!(r >= 0.0, "{r}");
            assert!(
                r <= highest_before * 1.5,
                "{r} tokens/s after the restart; the load peaked at {highest_before}"
            );
            assert!(r * covered <= total_before + server_after + 1.0);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        agent_metric(
            metrics_addr,
            "gpuscale_agent_engine_state",
            "state=\"warm\""
        ),
        Some(1.0)
    );
    engine.kill();
    scaler.shutdown().await.expect("scaler stops");
}
