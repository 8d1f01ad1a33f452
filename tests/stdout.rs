//! Commands that print to stdout stop quietly when the reader goes away
//! (`gpuscale version | head -c 5`), and the build records the commit of a
//! linked worktree (where `.git` is a file) and rebuilds when it moves.

use std::process::{Command, Stdio};

#[allow(dead_code)]
#[path = "../build.rs"]
mod build_script;

/// Runs the binary with its stdout a pipe whose reader is already closed,
/// so the first write fails with a broken pipe.
fn with_closed_stdout(args: &[&str]) -> (Option<i32>, String) {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_gpuscale"))
        .args(args)
        .env_remove("NODE_NAME")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("the binary runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn printing_commands_stop_quietly_when_stdout_is_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("libnvidia-ml.so.1");
    let socket = dir.path().join("kubelet.sock");
    let agent_once = [
        "agent",
        "--once",
        "--output",
        "json",
        "--kubernetes",
        "off",
        "--node-name",
        "n1",
        "--nvml-library",
        missing.to_str().expect("utf-8 path"),
        "--pod-resources-socket",
        socket.to_str().expect("utf-8 path"),
    ];
    for args in [&["version"][..], &["crd"][..], &agent_once[..]] {
        let (code, err) = with_closed_stdout(args);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(!err.contains("Broken pipe"), "{args:?}: {err}");
        assert_eq!(code, Some(0), "{args:?}: {err}");
    }
}

#[test]
fn version_through_head_prints_its_first_bytes() {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' version | head -c 5",
            env!("CARGO_BIN_EXE_gpuscale")
        ))
        .output()
        .expect("sh runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("gpusc"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn git(dir: &std::path::Path, args: &[&str]) {
    let status = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("git runs");
    assert!(status.success(), "git {args:?}");
}

#[test]
fn the_build_watches_head_and_the_branch_in_a_linked_worktree() {
    if Command::new("git").arg("--version").output().is_err() {
        panic!("git is needed by this test (scripts/test.sh installs it)");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let main = dir.path().join("main");
    std::fs::create_dir(&main).expect("mkdir");
    git(&main, &["init", "-q", "-b", "trunk"]);
    git(&main, &["commit", "-q", "--allow-empty", "-m", "one"]);
    let wt = dir.path().join("wt");
    git(
        &main,
        &[
            "worktree",
            "add",
            "-q",
            "-b",
            "topic",
            wt.to_str().expect("utf-8"),
        ],
    );
    assert!(
        wt.join(".git").is_file(),
        "a linked worktree's .git is a file"
    );
    let files = build_script::git_head_files(&wt);
    let shown: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    // The worktree's own HEAD, under the main repository's worktrees/.
    assert!(
        shown.iter().any(|p| p.ends_with("/worktrees/wt/HEAD")),
        "{shown:?}"
    );
    // The branch the worktree is on, in the common directory.
    assert!(
        shown
            .iter()
            .any(|p| p.ends_with("/main/.git/refs/heads/topic")),
        "{shown:?}"
    );
    // And in the main checkout, as before.
    let files = build_script::git_head_files(&main);
    assert!(files.iter().any(|p| p.ends_with(".git/HEAD")), "{files:?}");
    assert!(
        files.iter().any(|p| p.ends_with(".git/refs/heads/trunk")),
        "{files:?}"
    );
    // Outside a checkout: nothing to watch, and no error.
    let bare = tempfile::tempdir().expect("tempdir");
    assert!(build_script::git_head_files(bare.path()).is_empty());
}
