//! `gpuscale demo`, the README's first command, run as users run it (the
//! built binary), on a short stretch of the shipped trace: it must end on
//! its own with exit 0 and a summary in which every request that arrived
//! was served, none was dropped, and the scaler saw every simulated GPU.
//! It runs with the system's temporary directory as its working directory:
//! nothing the demo needs may be looked up relative to the repository.

use std::process::Command;

fn demo(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gpuscale"))
        .arg("demo")
        .args(args)
        .env_remove("RUST_LOG")
        .current_dir(std::env::temp_dir())
        .output()
        .expect("the binary runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The numbers after each `word` in `line`, in order (`"arrived 12,"` → 12).
fn number_after(line: &str, word: &str) -> u64 {
    let rest = line
        .split(word)
        .nth(1)
        .unwrap_or_else(|| panic!("{word:?} in {line:?}"));
    rest.trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|e| panic!("a number after {word:?} in {line:?}: {e}"))
}

fn summary_line<'a>(stdout: &'a str, key: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.trim_start().starts_with(key))
        .unwrap_or_else(|| panic!("summary line {key:?} in:\n{stdout}"))
}

#[test]
fn demo_replays_a_stretch_of_the_trace_serves_every_request_and_sees_every_gpu() {
    let dir = tempfile::tempdir().expect("tempdir");
    let chart = dir.path().join("demo.svg");
    let (code, stdout, stderr) = demo(&[
        "--duration",
        "3m",
        "--speed",
        "20",
        "--nodes",
        "2",
        "--plain",
        "--chart",
        chart.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("gpuscale demo: summary"), "{stdout}");
    // The plain view printed status lines while it ran.
    assert!(
        stderr.lines().any(|l| l.contains("replicas desired")),
        "{stderr}"
    );
    // On the demo's sped-up clock the agents are heard as often as they
    // report: no decision is held for replicas that only seem silent.
    assert!(
        !stderr.lines().any(|l| l.contains("incomplete:")),
        "{stderr}"
    );

    let requests = summary_line(&stdout, "requests");
    let arrived = number_after(requests, "arrived");
    let served = number_after(requests, "served");
    let dropped = number_after(requests, "dropped");
    assert!(arrived > 1000, "three minutes of the trace: {requests}");
    assert_eq!(served, arrived, "{requests}");
    assert_eq!(dropped, 0, "{requests}");

    // 2 nodes x 8 GPUs, all of them reported by the agents to the scaler.
    let saw = summary_line(&stdout, "scaler saw");
    assert_eq!(number_after(saw, "saw"), 16, "{saw}");
    assert_eq!(number_after(saw, "(of"), 16, "{saw}");

    let svg = std::fs::read_to_string(&chart).expect("the chart was written");
    assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"), "{svg}");
    assert!(svg.contains("</svg>"));
}

#[test]
fn the_scale_to_zero_scenario_takes_three_models_to_zero_and_back_with_nothing_failed() {
    let (code, stdout, stderr) = demo(&["--scenario", "scale-to-zero"]);
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let requests = summary_line(&stdout, "requests");
    let sent = number_after(requests, "requests");
    assert_eq!(sent, 19, "the script's requests: {requests}");
    assert_eq!(number_after(requests, "sent,"), sent, "{requests}");
    assert_eq!(
        number_after(requests, "full,"),
        0,
        "none failed: {requests}"
    );
    // chat and code wake twice (each is at zero again before its second
    // burst), summarize once; each ends at zero.
    for (model, times) in [("chat", 2), ("code", 2), ("summarize", 1)] {
        let line = summary_line(&stdout, model);
        assert_eq!(number_after(line, "from zero"), times, "{line}");
        assert_eq!(number_after(line, "to zero"), times, "{line}");
    }
    // Requests were held at zero and the scaler said why it woke.
    assert!(
        stdout.contains("(no ready replica: held)")
            && stdout.contains("requests held at the activator"),
        "{stdout}"
    );
    assert!(stdout.contains("1 → 0 (scale to zero: idle"), "{stdout}");
}

#[test]
fn demo_bad_flags_exit_2_naming_the_flag_and_the_allowed_values() {
    let (code, _, err) = demo(&["--speed", "0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--speed") && err.contains("at most"), "{err}");

    let (code, _, err) = demo(&["--nodes", "0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--nodes") && err.contains("1..=64"), "{err}");

    let (code, _, err) = demo(&["--profile", "h300-imaginary"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--profile") && err.contains("h200-llama3-8b-bf16"),
        "{err}"
    );

    let (code, _, err) = demo(&["--scenario", "scale-to-one"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--scenario") && err.contains("scale-to-zero"),
        "{err}"
    );

    let (code, _, err) = demo(&["--trace", "/nonexistent/trace.csv"]);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("/nonexistent/trace.csv"), "{err}");
}
