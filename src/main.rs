//! `gpuscale`: one binary, one subcommand per role.
//!
//! The composition root: parses the command line, sets up logging, and hands
//! over to the crate that owns each role. Exit codes: 0 success, 1 runtime
//! failure, 2 bad flags or configuration (the message names the flag, the
//! value and what is allowed).

use std::ffi::OsStr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod demo;
mod version;

/// GPU-aware autoscaler for LLM inference endpoints on Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "gpuscale", version = version::SHORT, about, long_about = None)]
struct Cli {
    /// Log line format on stderr (the level comes from RUST_LOG, default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "GPUSCALE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logging for every subcommand, set up once: stderr, level from RUST_LOG,
/// else `default_level`; colour per [`log_colour`].
fn init_tracing(format: LogFormat, default_level: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let colour = log_colour(
        format,
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Whether log lines carry ANSI colour: text format on a terminal only, and
/// never when `NO_COLOR` is set to anything but the empty string
/// (<https://no-color.org>). A pipe, a file or a container log gets plain
/// text; `--log-format json` is never coloured.
fn log_colour(format: LogFormat, stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    format == LogFormat::Text && stderr_is_terminal && no_color.is_none_or(OsStr::is_empty)
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Runs `f` on a multi-threaded runtime; exit code 2 for configuration
/// errors, 1 for runtime failures.
fn serve<E: std::fmt::Display>(
    is_config: impl Fn(&E) -> bool,
    f: impl std::future::Future<Output = Result<(), E>>,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(if is_config(&e) { 2 } else { 1 })
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print version, commit, target and wire-protocol fingerprint.
    Version,
    /// Run the node agent: sample GPUs, pods and engines every interval and
    /// stream them to the scaler (snapshot, then deltas), reconnecting with
    /// backoff; serve /metrics and /healthz.
    Agent(gpuscale_agent::AgentArgs),
    /// Run the scaler: ingest the agents' streams, keep windows per node, GPU,
    /// pod and model, decide per workload every tick; serve gRPC (agents,
    /// health, reflection) and /metrics, /healthz, /readyz. With
    /// --kubernetes: act on InferenceAutoscalers (leader election, /scale
    /// with readiness gating and drain, status, Events).
    Scaler(ScalerCommand),
    /// Print the InferenceAutoscaler CustomResourceDefinition (YAML), as
    /// deploy/base/crd.yaml holds it.
    Crd,
    /// Replay a request trace against a simulated GPU fleet driven by
    /// gpuscale, a baseline autoscaler or the lower bound; report SLO attainment
    /// and GPU-hours (`--suite` runs the benchmark suite).
    Sim(Box<gpuscale_sim::cli::SimArgs>),
    /// Run the per-pod request proxy in front of an inference engine: the
    /// batch limit from the node agent enforced with a FIFO queue, each
    /// request's TTFT and TPOT measured and reported to the agent, drain on
    /// scale-in; /healthz, /readyz, /drain and /metrics on the admin port.
    Proxy(Box<gpuscale_proxy::ProxyArgs>),
    /// Run the scale-to-zero activator in front of workloads that can reach
    /// zero replicas: requests for a workload with no ready replica are
    /// held (bounded, with a deadline) and the scaler is told at once; they
    /// are forwarded in order once a replica is warm; 429/503 with
    /// Retry-After beyond the bounds; /healthz, /readyz, /metrics.
    Activator(Box<gpuscale_proxy::ActivatorArgs>),
    /// Run everything on this machine, with no cluster and no GPU: a
    /// simulated GPU fleet replaying a request trace, real agents streaming
    /// to a real scaler that acts through a fake Kubernetes API server; a
    /// live view on stderr, a summary on stdout (logs: RUST_LOG, default
    /// error).
    Demo(Box<demo::DemoArgs>),
}

/// `gpuscale scaler` flags: the scaler's, and the Kubernetes mode's.
#[derive(Debug, clap::Args)]
struct ScalerCommand {
    #[command(flatten)]
    scaler: gpuscale_scaler::ScalerArgs,
    #[command(flatten)]
    kube: gpuscale_kube::KubeArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo's live view owns the terminal: only errors are logged.
    let default_level = match cli.command {
        Command::Demo(_) => "error",
        _ => "info",
    };
    init_tracing(cli.log_format, default_level);
    match cli.command {
        Command::Agent(args) => serve(gpuscale_agent::AgentError::is_config, async move {
            gpuscale_agent::run_from_args(&args, shutdown_signal()).await
        }),
        Command::Scaler(args) if args.kube.kubernetes => {
            serve(gpuscale_kube::KubeError::is_config, async move {
                gpuscale_kube::run_from_args(&args.scaler, &args.kube, shutdown_signal()).await
            })
        }
        Command::Scaler(args) => serve(gpuscale_scaler::ScalerError::is_config, async move {
            gpuscale_scaler::run_from_args(&args.scaler, shutdown_signal()).await
        }),
        Command::Crd => stdout_exit(&gpuscale_kube::crd_yaml()),
        Command::Version => stdout_exit(&format!("{}\n", version::long())),
        Command::Proxy(args) => serve(gpuscale_proxy::ProxyError::is_config, async move {
            gpuscale_proxy::run_from_args(&args, shutdown_signal()).await
        }),
        Command::Activator(args) => serve(gpuscale_proxy::ProxyError::is_config, async move {
            gpuscale_proxy::activator::run_from_args(&args, shutdown_signal()).await
        }),
        Command::Demo(args) => serve(demo::DemoError::is_config, async move {
            demo::run(&args, shutdown_signal()).await
        }),
        Command::Sim(args) => match gpuscale_sim::cli::run(*args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(if e.is_usage() { 2 } else { 1 })
            }
        },
    }
}

/// Writes `text` to stdout. A reader that went away (`gpuscale version |
/// head -c 5`) is not an error: the rest is not wanted.
pub(crate) fn write_stdout(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// [`write_stdout`] as the command's exit code.
fn stdout_exit(text: &str) -> ExitCode {
    match write_stdout(text) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: writing to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_colour_only_for_text_on_a_terminal_without_no_color() {
        let empty = OsStr::new("");
        let set = OsStr::new("1");
        assert!(log_colour(LogFormat::Text, true, None));
        assert!(log_colour(LogFormat::Text, true, Some(empty)));
        assert!(!log_colour(LogFormat::Text, true, Some(set)));
        assert!(!log_colour(LogFormat::Text, false, None));
        assert!(!log_colour(LogFormat::Json, true, None));
        assert!(!log_colour(LogFormat::Json, false, Some(set)));
    }
}
