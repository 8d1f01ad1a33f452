//! Rendering `deploy/` the way a cluster gets it: `kubectl kustomize`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The documents of a YAML stream, empty ones left out.
pub fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).expect("valid YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// `kubectl kustomize <dir>`; a missing kubectl fails the test (CI has it).
pub fn kustomize(dir: &Path) -> Vec<Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `kubectl kustomize` ({e}): these tests need kubectl 1.32 with kustomize on PATH \
                 (preinstalled on the CI machines; do not install Debian's kubernetes-client)"
            )
        });
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    docs(&String::from_utf8(out.stdout).expect("UTF-8"))
}

/// `deploy/overlays/<name>`, rendered.
pub fn overlay(name: &str) -> Vec<Value> {
    kustomize(&root().join("deploy/overlays").join(name))
}

/// Every overlay under `deploy/overlays`, by name.
pub fn overlay_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root().join("deploy/overlays"))
        .expect("deploy/overlays")
        .map(|e| {
            e.expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// The strings of a JSON array (nothing for anything else).
pub fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect()
}
