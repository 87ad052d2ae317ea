//! The signals that stop a foreground command or the daemon.

/// Exit code of a command that was interrupted (SIGINT convention).
pub const INTERRUPTED: i32 = 130;

/// Resolves on SIGINT, SIGTERM or SIGHUP, with the signal number.
pub async fn interrupted() -> i32 {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => libc::SIGINT,
        _ = term.recv() => libc::SIGTERM,
        _ = hup.recv() => libc::SIGHUP,
    }
}
