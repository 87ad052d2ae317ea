//! `hutch-bench`: Hutch's benchmarks, out of the production CLI. Boot latency and exec round
//! trip, the daemon's overhead, clones and pools, agent tasks, Firecracker's own timings. Each
//! run prints its figures and ratios; nothing is asserted on time.

#![forbid(unsafe_code)]

mod args;
mod boot;
mod clone;
mod error;
mod firecracker;
mod launch;
mod task;

use clap::Parser;

fn main() {
    let cli = args::Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HUTCH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_target(false)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hutch-bench: {}", hutch_core::chain(&e));
            1
        }
    };
    std::process::exit(code);
}

async fn run(cli: args::Cli) -> Result<i32, error::BenchError> {
    let home = hutch_daemon::Home::from_env()?;
    boot::bench(&home, cli.command).await
}
