//! Log lines fit where they go: ANSI colour only when stderr is a terminal
//! (a pseudo-terminal from util-linux `script`, in Debian's essential
//! `bsdutils`), never in a pipe or a file, never with `NO_COLOR`, never with
//! `--log-format json`.

use std::process::{Command, Output, Stdio};

const ESC: u8 = 0x1b;

/// `gpuscale agent --once` in no-GPU mode: it logs at least one line (the
/// mode) at info and exits.
fn agent_once_args(dir: &std::path::Path) -> Vec<String> {
    vec![
        "agent".into(),
        "--once".into(),
        "--kubernetes".into(),
        "off".into(),
        "--node-name".into(),
        "n1".into(),
        "--nvml-library".into(),
        dir.join("libnvidia-ml.so.1").display().to_string(),
        "--pod-resources-socket".into(),
        "off".into(),
    ]
}

fn gpuscale() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gpuscale"));
    c.env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .env_remove("GPUSCALE_LOG_FORMAT")
        .env_remove("NODE_NAME")
        .stdin(Stdio::null());
    c
}

/// Runs `args` with stdout and stderr on a pseudo-terminal; returns what
/// the terminal showed.
fn on_a_terminal(args: &[String], no_color: Option<&str>) -> Output {
    let quoted: Vec<String> = std::iter::once(env!("CARGO_BIN_EXE_gpuscale").to_string())
        .chain(args.iter().cloned())
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect();
    let mut c = Command::new("script");
    c.args(["-q", "-e", "-c", &quoted.join(" "), "/dev/null"])
        .env("RUST_LOG", "info")
        .env("SHELL", "/bin/sh")
        .env_remove("NO_COLOR")
        .env_remove("GPUSCALE_LOG_FORMAT")
        .env_remove("NODE_NAME")
        .stdin(Stdio::null());
    if let Some(v) = no_color {
        c.env("NO_COLOR", v);
    }
    let out = c.output().unwrap_or_else(|e| {
        panic!("cannot run util-linux `script` ({e}): Debian's essential package bsdutils has it")
    });
    assert!(
        out.status.success(),
        "gpuscale on a terminal: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn has_escape(bytes: &[u8]) -> bool {
    bytes.contains(&ESC)
}

#[test]
fn logs_to_a_pipe_or_a_file_carry_no_colour() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = agent_once_args(dir.path());

    let piped = gpuscale().args(&args).output().expect("run gpuscale");
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert_eq!(piped.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("no-GPU mode"),
        "a line was logged: {stderr}"
    );
    assert!(
        !has_escape(&piped.stderr),
        "ANSI codes in a pipe: {stderr:?}"
    );

    let path = dir.path().join("agent.log");
    let file = std::fs::File::create(&path).expect("create log file");
    let status = gpuscale()
        .args(&args)
        .stdout(Stdio::null())
        .stderr(file)
        .status()
        .expect("run gpuscale");
    assert!(status.success());
    let logged = std::fs::read(&path).expect("read log file");
    assert!(
        String::from_utf8_lossy(&logged).contains("no-GPU mode"),
        "a line was logged"
    );
    assert!(
        !has_escape(&logged),
        "ANSI codes in a file: {:?}",
        String::from_utf8_lossy(&logged)
    );
}

#[test]
fn a_terminal_gets_colour_unless_no_color_or_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = agent_once_args(dir.path());

    let coloured = on_a_terminal(&args, None);
    let shown = String::from_utf8_lossy(&coloured.stdout);
    assert!(shown.contains("no-GPU mode"), "{shown:?}");
    assert!(
        has_escape(&coloured.stdout),
        "text logs on a terminal are coloured: {shown:?}"
    );

    // NO_COLOR set to anything but the empty string turns colour off; the
    // empty string does not (https://no-color.org).
    let plain = on_a_terminal(&args, Some("1"));
    let shown = String::from_utf8_lossy(&plain.stdout);
    assert!(shown.contains("no-GPU mode"), "{shown:?}");
    assert!(!has_escape(&plain.stdout), "NO_COLOR=1: {shown:?}");
    assert!(has_escape(&on_a_terminal(&args, Some("")).stdout));

    let mut json_args = vec!["--log-format".to_string(), "json".to_string()];
    json_args.extend(args.iter().cloned());
    let json = on_a_terminal(&json_args, None);
    let shown = String::from_utf8_lossy(&json.stdout);
    assert!(shown.contains("no-GPU mode"), "{shown:?}");
    assert!(!has_escape(&json.stdout), "JSON logs: {shown:?}");
    let line = shown
        .lines()
        .find(|l| l.contains("no-GPU mode"))
        .expect("the mode line");
    let v: serde_json::Value = serde_json::from_str(line.trim()).expect("a JSON log line");
    assert!(v["level"].is_string(), "{v}");
}
