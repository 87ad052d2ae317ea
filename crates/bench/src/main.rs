//! `hutch-bench`: Hutch's benchmarks, out of the production CLI. Boot latency and exec round
//! trip, the daemon's overhead, clones and pools, agent tasks, Firecracker's own timings, the
//! secret broker. Each run prints its figures and ratios; nothing is asserted on time.

#![forbid(unsafe_code)]

mod args;
mod boot;
mod clone;
mod e2b;
mod error;
mod firecracker;
mod launch;
mod mcp;
mod secrets;
mod task;

use clap::Parser;

fn main() {
    let cli = args::Cli::parse();
    hutch_daemon::process::run_main("hutch-bench", run(cli))
}

async fn run(cli: args::Cli) -> Result<i32, error::BenchError> {
    let home = hutch_daemon::Home::from_env()?;
    boot::bench(&home, cli.command).await
}
