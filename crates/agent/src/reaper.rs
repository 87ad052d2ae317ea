//! Child reaping for PID 1: one place calls `waitpid(-1)`, reaps orphans that were re-parented
//! to us, and hands each of our own children's exit status to whoever spawned it.

use std::{
    collections::HashMap,
    process::{Child, Command},
    sync::{Arc, Mutex},
};

use hutch_protocol::ExitStatus;
use nix::{
    errno::Errno,
    sys::wait::{waitpid, WaitPidFlag, WaitStatus},
    unistd::Pid,
};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::oneshot,
};

/// Owns `waitpid(-1)` for the whole agent.
#[derive(Default)]
pub struct Reaper {
    waiters: Mutex<HashMap<i32, oneshot::Sender<ExitStatus>>>,
}

/// The agent's one reaper, started on first use (inside the tokio runtime).
pub fn global() -> std::io::Result<Arc<Reaper>> {
    static GLOBAL: Mutex<Option<Arc<Reaper>>> = Mutex::new(None);
    let mut slot = GLOBAL.lock().expect("reaper slot");
    if let Some(r) = slot.as_ref() {
        return Ok(r.clone());
    }
    let r = Reaper::start()?;
    *slot = Some(r.clone());
    Ok(r)
}

impl Reaper {
    /// Starts the reaper task; must run before any child is spawned.
    fn start() -> std::io::Result<Arc<Reaper>> {
        let reaper = Arc::new(Reaper::default());
        let mut sigchld = signal(SignalKind::child())?;
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                r.reap_all();
                sigchld.recv().await;
            }
        });
        Ok(reaper)
    }

    /// Spawns `cmd` and returns the child plus a receiver for its exit status. The waiter is
    /// registered under the same lock the reaper takes, so no exit can be missed.
    pub fn spawn(
        &self,
        cmd: &mut Command,
    ) -> std::io::Result<(Child, oneshot::Receiver<ExitStatus>)> {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        waiters.insert(child.id() as i32, tx);
        Ok((child, rx))
    }

    /// Reaps every exited child. Holds the waiter lock throughout, so it never runs while
    /// [`Reaper::spawn`] is inside `fork`/`exec` (std reaps a child whose exec failed itself,
    /// and would panic if we took that status first).
    fn reap_all(&self) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, ExitStatus::Signal(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid failed");
                    return;
                }
            };
            // Orphans re-parented to PID 1 have no waiter: reaping them is all they need.
            if let Some(tx) = waiters.remove(&pid.as_raw()) {
                let _ = tx.send(status);
            }
        }
    }
}
