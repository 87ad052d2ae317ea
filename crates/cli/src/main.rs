//! `hutch`: give every coding agent its own disposable microVM.

mod agent_bin;
mod args;
mod bench;
mod doctor;
mod error;
mod home;
mod image_cmd;
mod launch;
mod run;

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
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hutch: {}", error::chain(&e));
            1
        }
    };
    // Exit without waiting for blocking readers (stdin) the runtime may still hold.
    std::process::exit(code);
}

async fn dispatch(cli: args::Cli) -> Result<i32, error::CliError> {
    let home = home::Home::from_env()?;
    match cli.command {
        args::Command::Run(a) => run::run(&home, a).await,
        args::Command::Image(args::ImageCommand::Build(a)) => image_cmd::build(&home, a).await,
        args::Command::Image(args::ImageCommand::Ls) => image_cmd::list(&home),
        args::Command::Doctor => doctor::doctor(&home).await,
        args::Command::Bench(args::BenchCommand::Boot(a)) => bench::boot(&home, a).await,
    }
}
