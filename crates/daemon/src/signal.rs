//! The signals that stop a foreground command or the daemon.

/// Exit code of a command that was interrupted (SIGINT convention).
pub const INTERRUPTED: i32 = 130;

/// Resolves on SIGINT, SIGTERM or SIGHUP, with the signal number. The handlers are installed
/// when this is called, not when the future is first polled: a daemon told to stop while it is
/// still starting up then stops cleanly (removing what it made) instead of dying by the
/// signal's default action.
pub fn interrupted() -> impl std::future::Future<Output = i32> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    );
    async move {
        let (Ok(mut int), Ok(mut term), Ok(mut hup)) = handlers else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = int.recv() => libc::SIGINT,
            _ = term.recv() => libc::SIGTERM,
            _ = hup.recv() => libc::SIGHUP,
        }
    }
}

#[cfg(test)]
mod tests {
    /// A SIGTERM that arrives after `interrupted()` was called but before its future is first
    /// polled is caught (without the eager handlers it would kill this test process).
    #[tokio::test]
    async fn a_signal_before_the_first_poll_is_caught() {
        let stop = super::interrupted();
        rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::TERM)
            .expect("signal this process");
        assert_eq!(stop.await, libc::SIGTERM);
    }
}
