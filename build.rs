//! Build metadata for `gpuscale version` and the `gpuscale_build_info` metric:
//! the git commit (when built from a checkout), the target triple, the build
//! profile, and a fingerprint of the wire protocol (a hash of every `.proto`
//! under `proto/`), so operators can tell whether an agent and a scaler were
//! built from the same protocol.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into()));

    let mut protos = Vec::new();
    collect_protos(&root.join("proto"), &mut protos);
    protos.sort();
    // FNV-1a over (relative path, contents) of every proto file.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
        let rel = p
            .strip_prefix(&root)
            .unwrap_or(p)
            .to_string_lossy()
            .into_owned();
        for b in rel.bytes().chain(fs::read(p).unwrap_or_default()) {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rustc-env=GPUSCALE_PROTO_FINGERPRINT={hash:016x}");

    // A build without a checkout (the Containerfile's) passes the commit in
    // GPUSCALE_GIT_COMMIT.
    println!("cargo:rerun-if-env-changed=GPUSCALE_GIT_COMMIT");
    let given = std::env::var("GPUSCALE_GIT_COMMIT")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && s != "unknown");
    let commit = given.unwrap_or_else(|| git_commit(&root));
    for path in git_head_files(&root) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    println!("cargo:rustc-env=GPUSCALE_GIT_COMMIT={commit}");
    println!(
        "cargo:rustc-env=GPUSCALE_BUILD_TARGET={}",
        std::env::var("TARGET").unwrap_or_default()
    );
    println!(
        "cargo:rustc-env=GPUSCALE_BUILD_PROFILE={}",
        std::env::var("PROFILE").unwrap_or_default()
    );
}

/// `git rev-parse --short=12 HEAD` in `root`, or `unknown`.
fn git_commit(root: &Path) -> String {
    Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The files whose change moves HEAD: HEAD itself, the branch it points
/// to and `packed-refs`, wherever git keeps them. In a linked worktree
/// `.git` is a file and HEAD lives in the main repository's
/// `worktrees/<name>/`, the branch in its common directory; git says where.
/// Outside a checkout: none.
pub(crate) fn git_head_files(root: &Path) -> Vec<PathBuf> {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let mut refs = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        refs.push(branch);
    }
    refs.iter()
        .filter_map(|r| git(&["rev-parse", "--path-format=absolute", "--git-path", r]))
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .collect()
}

fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_protos(&path, out);
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
}
