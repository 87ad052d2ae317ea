//! What every Hutch binary's `main` does around its work: logging, the runtime, the exit code.

use std::future::Future;

/// Runs `work` as a Hutch binary's `main` and exits with its code: logs go to stderr, filtered
/// by `HUTCH_LOG` (default `warn`), coloured only on a terminal; `work` runs on a
/// multi-threaded runtime with the default worker count; an error is printed as
/// `{name}: {error and its causes}` and exits 1. The process exits without waiting for
/// blocking readers (stdin) the runtime may still hold.
pub fn run_main<E: std::error::Error>(name: &str, work: impl Future<Output = Result<i32, E>>) -> ! {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HUTCH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match runtime.block_on(work) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{name}: {}", hutch_core::chain(&e));
            1
        }
    };
    std::process::exit(code);
}
