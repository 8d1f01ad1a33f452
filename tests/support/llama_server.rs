//! llama.cpp's `llama-server` for tests that run a real inference engine on
//! the CPU: the binary that `scripts/llama-server.sh` builds once and caches
//! under `target/llama.cpp/`, a tiny random-weight model written at test
//! time, and the server as a child process killed on drop.
//!
//! Std only, so any test target can include it:
//!
//! ```text
//! #[path = "../../../tests/support/llama_server.rs"]   // from crates/<crate>/tests/
//! mod llama_server;
//! ```
//!
//! Nothing here skips: when the binary cannot be built (no C++ compiler, no
//! CMake and no pip, no network for the source), [`binary`] panics with the
//! script's message, so the test fails and says why.
//! `GPUSCALE_LLAMA_SERVER=/path/to/llama-server` uses that binary instead.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The workspace root: the nearest ancestor of this crate holding
/// `scripts/llama-server.sh`.
pub fn workspace_root() -> PathBuf {
    let start = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    start
        .ancestors()
        .find(|d| d.join("scripts/llama-server.sh").is_file())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| {
            panic!(
                "no scripts/llama-server.sh above {}: the helper runs inside the gpuscale workspace",
                start.display()
            )
        })
}

fn run_script(args: &[&str]) -> PathBuf {
    let script = workspace_root().join("scripts/llama-server.sh");
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} {} failed ({}); its message is above. The llama.cpp integration tests need \
         llama-server: run `scripts/llama-server.sh` (builds it under target/llama.cpp/, \
         about 10 minutes on 2 cores; needs a C++ compiler, make, and pip for CMake and the source)",
        script.display(),
        args.join(" "),
        out.status
    );
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let path = PathBuf::from(path);
    assert!(
        path.exists(),
        "{} printed `{}`, which does not exist",
        script.display(),
        path.display()
    );
    path
}

/// The `llama-server` binary, built first when it is not cached.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("GPUSCALE_LLAMA_SERVER") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "GPUSCALE_LLAMA_SERVER={} is not a file",
            p.display()
        );
        return p;
    }
    run_script(&[])
}

/// Writes the tiny test model (two layers, 64 wide, Llama tokenizer; 17 MB)
/// into `dir` and returns its path.
pub fn tiny_model(dir: &Path) -> PathBuf {
    let dir = dir.to_str().expect("a UTF-8 temporary directory");
    run_script(&["model", dir])
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// How to start the server.
#[derive(Debug, Clone)]
pub struct LlamaServerOptions {
    pub port: u16,
    /// Parallel slots (`-np`): requests decoded at once.
    pub slots: u32,
    /// Total context (`-c`), shared by the slots.
    pub context: u32,
    /// Extra arguments.
    pub extra: Vec<String>,
}

impl Default for LlamaServerOptions {
    fn default() -> Self {
        Self {
            port: free_port(),
            slots: 4,
            context: 8192,
            extra: Vec::new(),
        }
    }
}

/// A running `llama-server --metrics`, killed on drop. Its output goes to
/// `log` (shown by [`LlamaServer::log_tail`] when a test fails).
pub struct LlamaServer {
    child: Option<Child>,
    pub port: u16,
    pub log: PathBuf,
}

impl LlamaServer {
    /// Starts the server on 127.0.0.1 and waits until `/health` answers 200.
    pub fn start(binary: &Path, model: &Path, options: &LlamaServerOptions, log: &Path) -> Self {
        let out = std::fs::File::create(log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let err = out.try_clone().expect("log file handle");
        let child = Command::new(binary)
            .args(["-m", &model.to_string_lossy()])
            .args(["--host", "127.0.0.1", "--port", &options.port.to_string()])
            .args(["--metrics", "--no-webui", "-t", "1", "-tb", "1"])
            .args(["-np", &options.slots.to_string()])
            .args(["-c", &options.context.to_string()])
            .args(&options.extra)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let mut server = Self {
            child: Some(child),
            port: options.port,
            log: log.to_path_buf(),
        };
        if let Err(e) = server.wait_healthy(Duration::from_secs(120)) {
            let tail = server.log_tail(40);
            panic!("llama-server did not become healthy: {e}\n--- its log ---\n{tail}");
        }
        server
    }

    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Waits until `GET /health` answers 200.
    pub fn wait_healthy(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("the server exited: {status}"));
            }
            if let Ok((200, _)) = http_get(self.addr(), "/health") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("no 200 from /health within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last `lines` lines of the server's output.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A blocking `GET` over a fresh connection: the status and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head}")))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// One value of the server's own `/metrics` (`llamacpp:<name>`).
pub fn server_metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let (status, body) = http_get(addr, "/metrics").ok()?;
    if status != 200 {
        return None;
    }
    let wanted = format!("llamacpp:{name} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&wanted))
        .and_then(|v| v.trim().parse().ok())
}
