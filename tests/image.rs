//! The container image. The `Containerfile`'s runtime stage is minimal
//! (distroless, no shell), non-root, labelled and smoke-tested; and an image
//! with exactly that layout, built here without a registry or a daemon by
//! Debian's `buildah` from scratch (vfs storage) out of the binary and the
//! shared libraries `ldd` lists, runs `gpuscale version` and `gpuscale agent
//! --once` (no-GPU mode) from its own root filesystem as the user it
//! declares (`chroot --userspec`), with nothing in it writable by that user
//! (the manifests mount the root filesystem read-only). The Containerfile's
//! runtime stage itself is built too (`buildah bud`, its two source images
//! replaced by stand-ins made here): its smoke test runs, and it declares
//! what the check's image does.
//!
//! The binary: `$GPUSCALE_IMAGE_BINARY`, which `scripts/test.sh` builds
//! with the `dist` profile exactly as the Containerfile does; run outside
//! the test command, this test build's binary (it says so).
//!
//! What the check needs: `buildah` (the test command installs it; missing,
//! the check fails) and root (for `chroot`; CI runs as root; a non-root run
//! says on stderr that the check cannot run there and why).

mod containerfile;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The image's layout, as the check builds it: the Containerfile's runtime
/// stage (`the_check_layout_is_the_containerfile_runtime_stage` holds the
/// two together, and the check compares the committed image with both).
const BINARY: &str = "/usr/local/bin/gpuscale";
const USER: &str = "65532:65532";
const CMD: &[&str] = &["version"];
/// The label keys the image carries (OCI image-spec annotations).
const LABELS: &[&str] = &[
    "org.opencontainers.image.description",
    "org.opencontainers.image.licenses",
    "org.opencontainers.image.revision",
    "org.opencontainers.image.source",
    "org.opencontainers.image.title",
    "org.opencontainers.image.version",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_check_layout_is_the_containerfile_runtime_stage() {
    let stages = containerfile::stages();
    let runtime = stages.last().expect("a runtime stage");
    let builder = &stages[0];

    assert!(
        runtime.from.starts_with("gcr.io/distroless/cc-") && runtime.from.ends_with(":nonroot"),
        "the runtime base is distroless cc (glibc and libgcc, which the binary links; no shell), \
         nonroot variant: {}",
        runtime.from
    );
    assert_eq!(runtime.one("USER"), USER, "the runtime user");
    let copies = runtime.copies();
    assert_eq!(
        copies.len(),
        1,
        "the runtime stage copies the binary only: {copies:?}"
    );
    let copy = &copies[0];
    assert_eq!(copy.from.as_deref(), builder.name.as_deref());
    assert_eq!(copy.dst, BINARY);
    assert_eq!(runtime.exec_form("ENTRYPOINT"), [BINARY], "the entrypoint");
    assert_eq!(runtime.exec_form("CMD"), CMD, "the default command");
    // No shell in the runtime image: every RUN is exec form, and the one
    // there is the smoke test.
    let runs = runtime.all("RUN");
    for run in &runs {
        serde_json::from_str::<Vec<String>>(run)
            .unwrap_or_else(|_| panic!("RUN {run}: the runtime stage has no shell; use exec form"));
    }
    assert!(
        runs.iter()
            .any(|r| serde_json::from_str::<Vec<String>>(r).ok()
                == Some(vec![BINARY.to_string(), "version".to_string()])),
        "the runtime stage runs `gpuscale version` as its smoke test: {runs:?}"
    );
    // The USER line comes before the smoke test, so it runs as 65532.
    let position = |kw: &str| runtime.instructions.iter().position(|i| i.keyword == kw);
    assert!(position("USER") < position("RUN"));

    let labels = runtime.labels();
    let keys: Vec<&str> = labels.keys().map(String::as_str).collect();
    assert_eq!(keys, LABELS);
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION"),
        "the VERSION build argument's default is the crate's version"
    );
    assert_eq!(
        labels["org.opencontainers.image.licenses"],
        env!("CARGO_PKG_LICENSE")
    );
    let cargo = std::fs::read_to_string(repo().join("Cargo.toml")).expect("Cargo.toml");
    assert!(
        cargo.contains(&format!(
            "repository = \"{}\"",
            labels["org.opencontainers.image.source"]
        )),
        "the source label is the workspace's repository"
    );

    // The builder: the `dist` profile, which strips the binary.
    let build = builder.one("RUN");
    assert!(
        build.contains("cargo build --locked --profile dist --bin gpuscale")
            && build.contains(&format!("target/dist/gpuscale {}", copy.src)),
        "the builder stage builds the dist profile and installs it where the runtime copies from: {build}"
    );
    let dist = profile(&cargo, "dist");
    assert!(
        dist.contains(&"inherits = \"release\"".to_string())
            && dist.contains(&"debug = false".to_string())
            && dist.iter().any(|l| l.starts_with("strip = \"symbols\"")),
        "[profile.dist] is release code without debug info, stripped: {dist:?}"
    );
}

/// The lines of `[profile.NAME]` in a Cargo.toml.
fn profile(cargo: &str, name: &str) -> Vec<String> {
    let header = format!("[profile.{name}]");
    cargo
        .lines()
        .skip_while(|l| l.trim() != header)
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with('['))
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// `buildah` with its own storage under `dir` (vfs driver: no daemon, no
/// overlay mounts, nothing left behind outside `dir`).
struct Buildah {
    root: PathBuf,
    runroot: PathBuf,
}

impl Buildah {
    fn new(dir: &Path) -> Self {
        Self {
            root: dir.join("storage"),
            runroot: dir.join("run"),
        }
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("buildah")
            .arg("--root")
            .arg(&self.root)
            .arg("--runroot")
            .arg(&self.runroot)
            .args(["--storage-driver", "vfs"])
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run buildah ({e}): the image check needs Debian's buildah, which \
                     scripts/test.sh installs (apt-get install buildah)"
                )
            });
        assert!(
            out.status.success(),
            "buildah {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("UTF-8")
            .trim()
            .to_string()
    }
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// The shared libraries `ldd` resolves for `binary`, as absolute paths the
/// dynamic loader looks them up at (the loader itself included).
fn shared_libraries(binary: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .expect("ldd (Debian's libc-bin) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ldd {}: {text}{}",
        binary.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)`,
        // `/lib64/ld-linux-x86-64.so.2 (0x…)`, `linux-vdso.so.1 (0x…)`.
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let path = rest.split_whitespace().next().unwrap_or("");
                assert!(path.starts_with('/'), "ldd cannot resolve {name}: {line}");
                path
            }
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    assert!(
        libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
        "ldd lists libc: {text}"
    );
    libs
}

/// Copies `from` to `root` + `at` (following symbolic links: the image gets
/// the file's contents at the path the loader asks for).
fn stage_file(root: &Path, at: &Path, from: &Path) {
    let dest = root.join(at.strip_prefix("/").expect("an absolute path"));
    std::fs::create_dir_all(dest.parent().expect("a parent")).expect("create dirs");
    std::fs::copy(from, &dest)
        .unwrap_or_else(|e| panic!("copy {} to the image: {e}", from.display()));
}

/// Where `program` is on this process's PATH (the commands run in the image
/// get an empty environment, so it is looked up here).
fn on_path(program: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{program} is not on PATH"))
}

/// Runs `argv` (the image's entrypoint and arguments) inside `rootfs` as
/// `user` with an empty environment.
fn run_in_image(rootfs: &Path, user: &str, argv: &[String]) -> Output {
    Command::new(on_path("chroot"))
        .arg(format!("--userspec={user}"))
        .arg(rootfs)
        .args(argv)
        .env_clear()
        .output()
        .expect("chroot (coreutils) runs")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Nothing in the image's root filesystem may be written by `uid`/`gid`:
/// what runs with `readOnlyRootFilesystem` must not need to.
fn writable_by(rootfs: &Path, uid: u32, gid: u32) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![rootfs.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read the image's rootfs") {
            let path = entry.expect("a directory entry").path();
            let m = std::fs::symlink_metadata(&path).expect("stat");
            if m.file_type().is_symlink() {
                continue;
            }
            let mode = m.mode();
            if (m.uid() == uid && mode & 0o200 != 0)
                || (m.gid() == gid && mode & 0o020 != 0)
                || mode & 0o002 != 0
            {
                found.push(path.clone());
            }
            if m.is_dir() {
                stack.push(path);
            }
        }
    }
    found
}

/// Builds the Containerfile's last stage with `buildah bud`, its `FROM`
/// image and its `COPY --from` stage replaced by images made here (`libs`
/// on scratch; `binary` where the builder stage installs it); returns the
/// image's config and what the build printed.
fn build_runtime_stage(
    buildah: &Buildah,
    dir: &Path,
    libs: &[PathBuf],
    binary: &Path,
    commit: &str,
) -> (Value, String) {
    let stages = containerfile::stages();
    let builder = stages[0].name.clone().expect("the builder stage is named");
    let copies = stages.last().expect("a runtime stage").copies();
    let src = &copies
        .first()
        .expect("the runtime stage copies the binary")
        .src;

    let standin = |name: &str, files: &[(PathBuf, PathBuf)]| -> String {
        let root = dir.join(name);
        for (at, from) in files {
            stage_file(&root, at, from);
        }
        let image = format!("localhost/gpuscale-check-{name}:test");
        let c = buildah.run(&["from", "scratch"]);
        buildah.run(&["copy", &c, &format!("{}/", root.display()), "/"]);
        buildah.run(&["commit", "--quiet", &c, &image]);
        buildah.run(&["rm", &c]);
        image
    };
    let lib_files: Vec<(PathBuf, PathBuf)> = libs.iter().map(|l| (l.clone(), l.clone())).collect();
    let base = standin("base", &lib_files);
    let builder_image = standin("builder", &[(PathBuf::from(src), binary.to_path_buf())]);

    // The runtime stage's own lines, from its FROM to the end.
    let text = std::fs::read_to_string(containerfile::path()).expect("the Containerfile");
    let lines: Vec<&str> = text.lines().collect();
    let from = lines
        .iter()
        .rposition(|l| l.trim_start().to_ascii_uppercase().starts_with("FROM "))
        .expect("a FROM line");
    let mut stage = format!("FROM {base}\n");
    for line in &lines[from + 1..] {
        stage.push_str(&line.replace(
            &format!("--from={builder}"),
            &format!("--from={builder_image}"),
        ));
        stage.push('\n');
    }
    let file = dir.join("Containerfile.runtime");
    std::fs::write(&file, stage).expect("write the runtime stage");
    let context = dir.join("context");
    std::fs::create_dir_all(&context).expect("an empty build context");
    let image = "localhost/gpuscale-containerfile:test";
    let printed = buildah.run(&[
        "bud",
        "--pull-never",
        "--isolation=chroot",
        "--build-arg",
        &format!("REVISION={commit}"),
        "-f",
        &file.display().to_string(),
        "-t",
        image,
        &context.display().to_string(),
    ]);
    let inspect: Value = serde_json::from_str(&buildah.run(&["inspect", "--type", "image", image]))
        .expect("buildah inspect prints JSON");
    buildah.run(&["rmi", image, &builder_image, &base]);
    (inspect["OCIv1"]["config"].clone(), printed)
}

#[test]
fn an_image_with_the_runtime_layout_runs_version_and_agent_once_as_65532() {
    if !is_root() {
        eprintln!(
            "image check NOT RUN: it needs root (chroot into the image's root filesystem); \
             CI runs scripts/test.sh as root"
        );
        return;
    }
    let (binary, dist) = match std::env::var_os("GPUSCALE_IMAGE_BINARY") {
        Some(b) => (PathBuf::from(b), true),
        None => {
            eprintln!(
                "image check: GPUSCALE_IMAGE_BINARY is not set (scripts/test.sh sets it to the \
                 dist build); checking this test build's binary instead"
            );
            (PathBuf::from(env!("CARGO_BIN_EXE_gpuscale")), false)
        }
    };
    assert!(binary.is_file(), "no binary at {}", binary.display());
    if dist {
        // The image's binary carries neither symbols nor debug info.
        let out = Command::new("readelf")
            .args(["-S", "--wide"])
            .arg(&binary)
            .output()
            .expect("readelf (binutils) runs");
        let sections = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "readelf: {sections}");
        for section in [".symtab", ".debug_info", ".debug_line"] {
            assert!(
                !sections.contains(&format!(" {section} ")),
                "{} has a {section} section: the dist profile strips it",
                binary.display()
            );
        }
    }

    let version = Command::new(&binary)
        .arg("version")
        .output()
        .expect("the binary runs here");
    let version_text = String::from_utf8_lossy(&version.stdout).into_owned();
    let commit = version_text
        .lines()
        .find_map(|l| l.strip_prefix("commit: "))
        .expect("`gpuscale version` prints the commit")
        .to_string();

    let dir = tempfile::tempdir().expect("tempdir");
    let buildah = Buildah::new(dir.path());
    let stage = dir.path().join("stage");
    let libs = shared_libraries(&binary);
    for lib in &libs {
        stage_file(&stage, lib, lib);
    }
    stage_file(&stage, Path::new(BINARY), &binary);

    // The Containerfile's labels, its build arguments as a release passes them.
    let runtime = containerfile::runtime();
    let mut labels: BTreeMap<String, String> = runtime.labels();
    labels.insert("org.opencontainers.image.revision".into(), commit.clone());

    let container = buildah.run(&["from", "scratch"]);
    let stage_arg = format!("{}/", stage.display());
    buildah.run(&["copy", &container, &stage_arg, "/"]);
    let entrypoint = serde_json::to_string(&[BINARY]).expect("JSON");
    let cmd = serde_json::to_string(CMD).expect("JSON");
    let mut config: Vec<String> = vec![
        "config".into(),
        "--user".into(),
        USER.into(),
        "--entrypoint".into(),
        entrypoint,
        "--cmd".into(),
        cmd,
    ];
    for (k, v) in &labels {
        config.push("--label".into());
        config.push(format!("{k}={v}"));
    }
    config.push(container.clone());
    let config: Vec<&str> = config.iter().map(String::as_str).collect();
    buildah.run(&config);
    let image = "localhost/gpuscale-image-check:test";
    buildah.run(&["commit", "--quiet", &container, image]);
    buildah.run(&["rm", &container]);

    // The committed image declares what the Containerfile's runtime stage does.
    let inspect: Value = serde_json::from_str(&buildah.run(&["inspect", "--type", "image", image]))
        .expect("buildah inspect prints JSON");
    let declared = &inspect["OCIv1"]["config"];
    assert_eq!(declared["User"], runtime.one("USER"));
    assert_eq!(
        declared["Entrypoint"],
        serde_json::json!(runtime.exec_form("ENTRYPOINT"))
    );
    assert_eq!(declared["Cmd"], serde_json::json!(runtime.exec_form("CMD")));
    for key in LABELS {
        assert!(
            declared["Labels"][key]
                .as_str()
                .is_some_and(|v| !v.is_empty()),
            "label {key}: {declared}"
        );
    }

    // The Containerfile's own runtime stage, built by `buildah bud` with
    // stand-ins for the two images it starts from (no registry here): the
    // base holding the libraries (what distroless cc gives the binary), the
    // builder holding the binary where the runtime stage copies it from.
    // Its smoke test runs (chroot isolation), and the image it makes
    // declares what the check's image does.
    let (built, smoke) = build_runtime_stage(&buildah, dir.path(), &libs, &binary, &commit);
    assert!(
        smoke.contains(version_text.lines().next().expect("a version line")),
        "the runtime stage's smoke test prints the version: {smoke}"
    );
    for key in ["User", "Entrypoint", "Cmd", "Labels"] {
        assert_eq!(
            built[key], declared[key],
            "{key}: the Containerfile's runtime stage (left) and the check's image (right)"
        );
    }

    // Run it from the image's own root filesystem: a new container from the
    // committed image, mounted (vfs: a directory).
    let from_image = buildah.run(&["from", "--pull-never", image]);
    let rootfs = PathBuf::from(buildah.run(&["mount", &from_image]));
    let user = declared["User"].as_str().expect("a user").to_string();
    let (uid, gid) = user.split_once(':').expect("uid:gid");
    let (uid, gid): (u32, u32) = (uid.parse().expect("uid"), gid.parse().expect("gid"));
    assert_eq!(
        writable_by(&rootfs, uid, gid),
        Vec::<PathBuf>::new(),
        "the image's user can write nothing in its root filesystem"
    );
    assert!(!rootfs.join("bin/sh").exists(), "the image has no shell");
    let argv = |args: &[&str]| -> Vec<String> {
        let mut v: Vec<String> =
            serde_json::from_value(declared["Entrypoint"].clone()).expect("an entrypoint array");
        v.extend(args.iter().map(|a| a.to_string()));
        v
    };

    // The default command, `gpuscale version`.
    let cmd: Vec<String> = serde_json::from_value(declared["Cmd"].clone()).expect("a cmd array");
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let out = run_in_image(&rootfs, &user, &argv(&cmd));
    let shown = text(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "gpuscale version in the image: {shown}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        version_text,
        "the image's binary is the one checked"
    );
    assert!(
        version_text.starts_with(&format!(
            "gpuscale {}\n",
            declared["Labels"]["org.opencontainers.image.version"]
                .as_str()
                .expect("a version label")
        )),
        "the version label is the binary's: {version_text}"
    );

    // The agent in no-GPU mode: no NVML library in the image, no kubelet.
    let out = run_in_image(
        &rootfs,
        &user,
        &argv(&[
            "agent",
            "--once",
            "--kubernetes",
            "off",
            "--node-name",
            "image-check",
            "--pod-resources-socket",
            "off",
        ]),
    );
    let shown = text(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "gpuscale agent --once in the image: {shown}"
    );
    let snapshot: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("agent --once prints a JSON snapshot ({e}): {shown}"));
    assert_eq!(snapshot["node"], "image-check", "{shown}");
    assert_eq!(snapshot["gpus"], serde_json::json!([]), "{shown}");
    assert_eq!(snapshot["agent"]["nvml_available"], false, "{shown}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-GPU mode"),
        "{shown}"
    );

    let size = buildah.run(&["images", "--format", "{{.Size}}", image]);
    eprintln!(
        "image check: {} ({} libraries: {}) in {image}, {size}, ran as {user}",
        binary.display(),
        libs.len(),
        libs.iter()
            .map(|l| l.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    buildah.run(&["umount", &from_image]);
    buildah.run(&["rm", &from_image]);
    buildah.run(&["rmi", image]);
}
