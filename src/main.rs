//! `gpuscale`: one binary, one subcommand per role.
//!
//! The composition root: parses the command line, sets up logging, and hands
//! over to the crate that owns each role. Exit codes: 0 success, 1 runtime
//! failure, 2 bad flags or configuration (the message names the flag, the
//! value and what is allowed).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod version;

/// GPU-aware autoscaler for LLM inference endpoints on Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "gpuscale", version = version::SHORT, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print version, commit, target and wire-protocol fingerprint.
    Version,
    /// Replay a request trace against a simulated GPU fleet driven by
    /// gpuscale, a baseline autoscaler or the oracle; report SLO attainment
    /// and GPU-hours (`--suite` runs the benchmark suite).
    Sim(Box<gpuscale_sim::cli::SimArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("{}", version::long());
            ExitCode::SUCCESS
        }
        Command::Sim(args) => match gpuscale_sim::cli::run(*args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(if e.is_usage() { 2 } else { 1 })
            }
        },
    }
}
