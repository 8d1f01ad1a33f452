//! `gpuscale sim` without the rest of the `gpuscale` binary:
//! `cargo run --release -p gpuscale-sim --example sim -- --suite --out target/sim-suite`
//! takes the same flags.

use clap::Parser;
use gpuscale_sim::cli::SimArgs;

#[derive(Debug, Parser)]
#[command(name = "sim", about = "gpuscale sim (the simulator alone)")]
struct Cli {
    #[command(flatten)]
    args: SimArgs,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = gpuscale_sim::cli::run(cli.args) {
        eprintln!("error: {e}");
        std::process::exit(if e.is_usage() { 2 } else { 1 });
    }
}
