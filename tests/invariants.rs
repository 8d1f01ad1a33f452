//! The architecture's invariants (ARCHITECTURE.md, "Invariants"), checked
//! mechanically over the workspace's manifests and sources, as
//! rust-analyzer's tidy tests do: a change that breaks one fails here with
//! the file and what it broke, instead of drifting from the document.
//!
//! Each check reads files only; none builds anything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn rel(p: &Path) -> String {
    p.strip_prefix(root())
        .unwrap_or(p)
        .to_string_lossy()
        .replace('\\', "/")
}

/// The crate directories under `crates/`, by directory name.
fn crates() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root().join("crates"))
        .expect("crates/")
        .flatten()
        .filter(|e| e.path().join("Cargo.toml").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The names in a manifest's `[dependencies]` table (not dev or build).
fn dependencies(manifest: &str) -> Vec<String> {
    let mut in_deps = false;
    let mut out = Vec::new();
    for line in manifest.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_deps = t == "[dependencies]";
            continue;
        }
        if !in_deps || t.is_empty() || t.starts_with('#') {
            continue;
        }
        // `name = ...` or `name.workspace = true`.
        if let Some((key, _)) = t.split_once('=') {
            let name = key.trim().split('.').next().unwrap_or("");
            out.push(name.trim_matches('"').to_string());
        }
    }
    out
}

// ---------------------------------------------------------------------------
// A small Rust lexer: the code of a file with comments, strings and char
// literals blanked (kept as spaces, line breaks kept), so that searches and
// brace counting see only code.

fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, c: u8| out.push(if c == b'\n' { b'\n' } else { b' ' });
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
        } else if c == b'r'
            && (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#'))
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
        {
            // Raw string r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            while j < b.len() {
                if b[j] == b'"'
                    && b[j + 1..]
                        .iter()
                        .take(hashes)
                        .filter(|&&h| h == b'#')
                        .count()
                        == hashes
                {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            for &x in &b[i..j.min(b.len())] {
                blank(&mut out, x);
            }
            i = j;
        } else if c == b'"' {
            out.push(b' ');
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    blank(&mut out, b[i]);
                    i += 1;
                }
                if i < b.len() {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
            out.push(b' ');
            i += 1;
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            let end = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..]
                    .iter()
                    .position(|&x| x == b'\'')
                    .map(|p| i + 2 + p)
            } else if b.get(i + 2) == Some(&b'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(e) => {
                    out.extend(std::iter::repeat_n(b' ', e + 1 - i));
                    i = e + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `code` (see [`code_only`]) without its `#[cfg(test)] mod ... { }` blocks.
fn without_test_modules(code: &str) -> String {
    let mut out = code.to_string();
    let mut from = 0;
    while let Some(found) = out[from..].find("#[cfg(test)]") {
        let at = from + found;
        from = at + 1;
        let rest = out[at + 12..].trim_start();
        if !rest.starts_with("mod ") {
            continue;
        }
        let Some(open) = out[at..].find('{').map(|o| at + o) else {
            break;
        };
        let bytes = out.as_bytes();
        let mut depth = 0;
        let mut end = open;
        for (k, &b) in bytes.iter().enumerate().skip(open) {
            match b {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = k;
                        break;
                    }
                }
                _ => {}
            }
        }
        let blanked: String = out[at..=end]
            .chars()
            .map(|c| if c == '\n' { c } else { ' ' })
            .collect();
        out.replace_range(at..=end, &blanked);
    }
    out
}

/// Every function in `code` (see [`code_only`]) with a body: its name, the
/// line it starts on and its length in lines (signature to closing brace).
fn functions(code: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let line_of = {
        let mut starts = vec![0];
        for (i, ch) in code.char_indices() {
            if ch == '\n' {
                starts.push(i + 1);
            }
        }
        move |pos: usize| starts.partition_point(|&s| s <= pos)
    };
    let bytes = code.as_bytes();
    let mut out = Vec::new();
    let mut search = 0;
    while let Some(found) = code[search..].find("fn ") {
        let at = search + found;
        search = at + 3;
        if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
            continue;
        }
        let name: String = code[at + 3..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() {
            continue;
        }
        // The body opens at the first `{` before any `;` (a declaration
        // without a body ends at `;`), skipping the signature's generics
        // and argument lists.
        let mut depth_paren = 0i32;
        let mut j = at + 3 + name.len();
        let mut open = None;
        while j < bytes.len() {
            match bytes[j] {
                b'(' | b'[' => depth_paren += 1,
                b')' | b']' => depth_paren -= 1,
                b';' if depth_paren == 0 => break,
                b'{' if depth_paren == 0 => {
                    open = Some(j);
                    break;
                }
                _ => {}
            }
            j += 1;
        }
        let Some(open) = open else { continue };
        let mut depth = 0i32;
        let mut k = open;
        while k < bytes.len() {
            match bytes[k] {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                _ => {}
            }
            k += 1;
        }
        let first = line_of(at);
        let last = line_of(k);
        let _ = &lines;
        out.push((name, first, last + 1 - first));
    }
    out
}

// ---------------------------------------------------------------------------

/// Crates that may do I/O, run async code or log: never `core` or `policy`.
const IMPURE: &[&str] = &[
    "tokio",
    "futures",
    "tonic",
    "hyper",
    "hyper-util",
    "axum",
    "tower",
    "kube",
    "k8s-openapi",
    "tracing",
    "log",
    "nvml-wrapper",
    "libc",
    "prometheus-client",
    "reqwest",
];

#[test]
fn core_and_policy_are_pure() {
    let mut broken = Vec::new();
    for krate in ["core", "policy"] {
        let dir = root().join("crates").join(krate);
        for dep in dependencies(&read(&dir.join("Cargo.toml"))) {
            if IMPURE.contains(&dep.as_str()) {
                broken.push(format!("crates/{krate}/Cargo.toml depends on {dep}"));
            }
        }
        for file in rust_files(&dir.join("src")) {
            let code = without_test_modules(&code_only(&read(&file)));
            for needle in [
                "std::fs",
                "std::net::Tcp",
                "std::net::Udp",
                "ToSocketAddrs",
                "std::env",
                "std::process",
                "SystemTime::now",
                "Instant::now",
                "async fn",
                ".await",
                "println!",
                "eprintln!",
                "tracing::",
            ] {
                if code.contains(needle) {
                    broken.push(format!("{} uses {needle}", rel(&file)));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "core and policy have no async code, do no I/O, read no clock or environment and do not log:\n{}",
        broken.join("\n")
    );
}

#[test]
fn dependencies_point_one_way() {
    // Which gpuscale crates each crate may depend on (ARCHITECTURE.md:
    // core <- policy <- everything else; rt (the clock) under the agent and
    // the scaler only; the scaler knows nothing of Kubernetes; the simulator
    // nothing of the scaler).
    let allowed: BTreeMap<&str, &[&str]> = BTreeMap::from([
        ("core", &[][..]),
        ("rt", &["gpuscale-core"][..]),
        ("policy", &["gpuscale-core"][..]),
        ("observe", &["gpuscale-core", "gpuscale-policy"][..]),
        ("proto", &["gpuscale-core"][..]),
        ("telemetry", &["gpuscale-core", "gpuscale-proto"][..]),
        (
            "agent",
            &[
                "gpuscale-core",
                "gpuscale-rt",
                "gpuscale-proto",
                "gpuscale-telemetry",
            ][..],
        ),
        (
            "scaler",
            &[
                "gpuscale-core",
                "gpuscale-rt",
                "gpuscale-policy",
                "gpuscale-observe",
                "gpuscale-proto",
            ][..],
        ),
        (
            "kube",
            &["gpuscale-core", "gpuscale-policy", "gpuscale-scaler"][..],
        ),
        ("proxy", &["gpuscale-core", "gpuscale-proto"][..]),
        (
            "sim",
            &["gpuscale-core", "gpuscale-policy", "gpuscale-observe"][..],
        ),
        ("fake-apiserver", &["gpuscale-core"][..]),
        ("fake-nvml", &[][..]),
    ]);
    let mut broken = Vec::new();
    for krate in crates() {
        let Some(ok) = allowed.get(krate.as_str()) else {
            broken.push(format!(
                "crates/{krate} is not in this test's dependency table: add it with the crates it may use"
            ));
            continue;
        };
        let manifest = read(&root().join("crates").join(&krate).join("Cargo.toml"));
        for dep in dependencies(&manifest) {
            let internal = dep.starts_with("gpuscale-") || dep == "fake-nvml";
            if internal && !ok.contains(&dep.as_str()) {
                broken.push(format!("crates/{krate} depends on {dep}"));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

#[test]
fn wire_types_are_named_only_in_proto_and_at_the_grpc_edges() {
    // `proto` converts the agent stream (validating TryFroms); the public
    // APIs render their own response messages at their edge.
    const EDGES: &[&str] = &[
        "crates/agent/src/uplink.rs",         // the agent stream's client
        "crates/telemetry/src/push.rs",       // the agent's ServingService
        "crates/proxy/src/sidecar/link.rs",   // the proxy, a ServingService client
        "crates/proxy/src/activator/link.rs", // the activator, an ActivatorService client
        "crates/scaler/src/ingest.rs",        // the agent stream's server
        "crates/scaler/src/state.rs",         // directives onto a stream's queue
        "crates/scaler/src/state/parity.rs",  // test: reports as the wire carries them
        "crates/scaler/src/lib.rs",           // service registration
        "crates/scaler/src/api/mod.rs",       // the public APIs
        "crates/scaler/src/api/recommend.rs", // ScalerService
        "crates/scaler/src/api/keda.rs",      // KEDA's external scaler
        "crates/scaler/src/api/activator.rs", // ActivatorService
    ];
    let mut broken = Vec::new();
    for krate in crates().into_iter().filter(|c| c != "proto") {
        for file in rust_files(&root().join("crates").join(&krate).join("src")) {
            let code = code_only(&read(&file));
            let name = rel(&file);
            if code.contains("prost::") || code.contains("prost_types") {
                broken.push(format!("{name} names prost"));
            }
            let wire = code.contains("gpuscale_proto::v1")
                || code.contains("proto::v1::")
                || code.contains("gpuscale_proto::{v1")
                || code.contains("gpuscale_proto::externalscaler");
            if wire && !EDGES.contains(&name.as_str()) {
                broken.push(format!("{name} names wire types"));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "wire types belong to proto and the listed gRPC edges:\n{}",
        broken.join("\n")
    );
}

#[test]
fn only_kube_and_the_agents_kubernetes_modules_use_the_kube_client() {
    const ALLOWED: &[&str] = &[
        "crates/agent/src/readiness.rs", // the readiness gate: pod status
        "crates/agent/src/discovery.rs", // the node's pods
        "crates/agent/src/node.rs",      // builds the client for those two
        "crates/agent/src/simulated.rs", // the demo's agents, the same two
    ];
    let mut broken = Vec::new();
    for krate in crates() {
        if krate == "kube" || krate == "fake-apiserver" {
            continue;
        }
        for file in rust_files(&root().join("crates").join(&krate).join("src")) {
            let code = code_only(&read(&file));
            let name = rel(&file);
            let uses = code.contains("kube::") && !code.contains("gpuscale_kube::")
                || code.contains("use kube")
                || code.contains("k8s_openapi");
            if uses && !ALLOWED.contains(&name.as_str()) {
                broken.push(name);
            }
        }
    }
    assert!(
        broken.is_empty(),
        "only crates/kube and the agent's Kubernetes modules talk to the API server; these use the kube client too:\n{}",
        broken.join("\n")
    );
}

#[test]
fn every_crate_forbids_unsafe_but_fake_nvml() {
    let root_manifest = read(&root().join("Cargo.toml"));
    assert!(
        root_manifest.contains("unsafe_code = \"forbid\""),
        "the workspace lints forbid unsafe code"
    );
    let mut broken = Vec::new();
    for krate in crates().into_iter().filter(|c| c != "fake-nvml") {
        let manifest = read(&root().join("crates").join(&krate).join("Cargo.toml"));
        let inherits = manifest
            .split("[lints]")
            .nth(1)
            .is_some_and(|rest| rest.trim_start().starts_with("workspace = true"));
        if !inherits {
            broken.push(format!(
                "crates/{krate}/Cargo.toml does not inherit the workspace lints"
            ));
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// The longest a function in `crates/` may be, in lines.
const MAX_FN_LINES: usize = 150;

/// Functions allowed past [`MAX_FN_LINES`]: tables (data written as code),
/// each with its reason.
const LONG_FUNCTIONS: &[(&str, &str, &str)] = &[
    (
        "crates/agent/src/exporter.rs",
        "encode_gpus",
        "table: the GPU metric families",
    ),
    (
        "crates/agent/src/exporter.rs",
        "encode_engines",
        "table: the engine metric families",
    ),
    (
        "crates/scaler/src/metrics.rs",
        "new",
        "table: the scaler's metric registrations",
    ),
    (
        "crates/scaler/src/export.rs",
        "register",
        "table: the per-workload metric registrations",
    ),
];

#[test]
fn no_function_in_crates_is_over_150_lines_except_tables() {
    let mut broken = Vec::new();
    for file in rust_files(&root().join("crates")) {
        let name = rel(&file);
        for (f, line, len) in functions(&code_only(&read(&file))) {
            let allowed = LONG_FUNCTIONS.iter().any(|(p, n, _)| *p == name && *n == f);
            if len > MAX_FN_LINES && !allowed {
                broken.push(format!("{name}:{line} fn {f}: {len} lines"));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "functions over {MAX_FN_LINES} lines (split them, or list a table in LONG_FUNCTIONS with why):\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_lexer_and_the_function_finder_see_code_only() {
    let src = r##"
fn short() { let s = "}}}"; let c = '}'; let r = r#"{"#; }
// fn commented() { {
/* fn block() { */
fn two<'a>(x: &'a str) -> &'a str {
    x
}
trait T { fn declared(&self); }
"##;
    let found = functions(&code_only(src));
    let names: Vec<(&str, usize)> = found.iter().map(|(n, _, l)| (n.as_str(), *l)).collect();
    assert_eq!(names, vec![("short", 1), ("two", 3)]);
    let code = code_only("let x = \"std::fs\"; // std::net\n");
    assert!(!code.contains("std::fs") && !code.contains("std::net"));
}
