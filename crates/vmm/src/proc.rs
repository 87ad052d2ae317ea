//! Processes by exact identity: `/proc/<pid>/stat` start times and pidfds, so that a recorded
//! (pid, start time) pair never reaches a recycled pid.

use std::os::fd::{AsFd, OwnedFd};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::process::{
    pidfd_open, pidfd_send_signal, waitid, Pid, PidfdFlags, Signal, WaitId, WaitIdOptions,
};
use std::time::{Duration, Instant};

use tokio::process::Child;

use crate::VmmError;

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stat {
    /// Field 22: when the process started, in clock ticks since boot.
    pub start_time: u64,
    /// State `Z`: exited, not yet reaped.
    pub zombie: bool,
}

/// Reads `/proc/<pid>/stat`; `None` if there is no such process.
pub(crate) fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `comm` (field 2) may contain spaces and parentheses: fields 3… follow the last ')'.
    let rest = text.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        zombie: *fields.first()? == "Z",
        start_time: fields.get(22 - 3)?.parse().ok()?,
    })
}

/// The arguments of a live process (empty for a zombie); `None` if there is no such process.
pub(crate) fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// A pidfd: a handle on one process that stays valid (and never points elsewhere) after the
/// process exits and its pid is reused.
#[derive(Debug)]
pub(crate) struct PidFd(OwnedFd);

impl PidFd {
    /// Opens a pidfd for `pid`. Check the process's identity *after* this: if it still matches
    /// then, the pidfd refers to that very process.
    pub(crate) fn open(pid: u32) -> std::io::Result<Self> {
        let pid = i32::try_from(pid)
            .ok()
            .and_then(Pid::from_raw)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ESRCH))?;
        Ok(Self(pidfd_open(pid, PidfdFlags::empty())?))
    }

    /// Whether the process has exited (reaped or not), waiting up to `timeout` for it.
    pub(crate) fn wait_exit(&self, timeout: Duration) -> bool {
        let timeout = Timespec::try_from(timeout).unwrap_or(Timespec {
            tv_sec: i64::MAX,
            tv_nsec: 0,
        });
        let mut fds = [PollFd::new(&self.0, PollFlags::IN)];
        poll(&mut fds, Some(&timeout)).is_ok_and(|n| n > 0)
    }

    /// Whether the process has exited.
    pub(crate) fn exited(&self) -> bool {
        self.wait_exit(Duration::ZERO)
    }

    /// Sends SIGKILL to exactly this process (a no-op once it has exited).
    pub(crate) fn kill(&self) -> std::io::Result<()> {
        match pidfd_send_signal(&self.0, Signal::KILL) {
            Err(e) if e == rustix::io::Errno::SRCH => Ok(()),
            r => Ok(r?),
        }
    }

    /// Reaps the process if it has exited and is our child; otherwise does nothing (its parent,
    /// or init, reaps it).
    pub(crate) fn reap(&self) {
        let _ = waitid(
            WaitId::PidFd(self.0.as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
        );
    }
}

/// The fields every backend's `identity.json` starts with: which VM, and its process exactly.
#[derive(serde::Deserialize)]
struct Recorded {
    id: String,
    pid: u32,
    start_time: u64,
}

/// A recorded VM's process, found alive and checked to be the recorded one.
pub(crate) struct Found {
    /// Its pid.
    pub(crate) pid: u32,
    /// A pidfd on it, opened before the checks: it names the checked process.
    pub(crate) pidfd: PidFd,
    /// Its command line, for the backend's own checks.
    pub(crate) args: Vec<String>,
}

impl Found {
    /// Whether the command line has `flag` followed by `value`.
    pub(crate) fn has(&self, flag: &str, value: &str) -> bool {
        self.args.windows(2).any(|w| w[0] == flag && w[1] == value)
    }
}

/// [`VmmError::Gone`] for VM `id` of `run_dir`.
pub(crate) fn gone(id: &str, run_dir: &std::path::Path, why: String) -> VmmError {
    VmmError::Gone {
        id: id.to_string(),
        run_dir: run_dir.to_path_buf(),
        why,
    }
}

/// For [`crate::Vmm::adopt`]: checks `id`, reads the identity record at `identity` (a
/// backend's type `I`), checks that it names VM `id`, and finds its process alive and started at the recorded
/// time, so that a recycled pid is never taken for it. [`VmmError::Gone`] otherwise.
pub(crate) fn find_recorded<I: serde::de::DeserializeOwned>(
    id: &str,
    run_dir: &std::path::Path,
    identity: &std::path::Path,
) -> Result<(I, Found), VmmError> {
    crate::validate_id(id)?;
    let gone = |why: String| gone(id, run_dir, why);
    let bytes = match std::fs::read(identity) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(gone("no identity.json".into()))
        }
        Err(e) => return Err(VmmError::io("read", identity, e)),
    };
    let unreadable = |e: serde_json::Error| gone(format!("unreadable identity.json: {e}"));
    let recorded: Recorded = serde_json::from_slice(&bytes).map_err(unreadable)?;
    let record: I = serde_json::from_slice(&bytes).map_err(unreadable)?;
    if recorded.id != id {
        return Err(gone(format!("identity.json names VM {:?}", recorded.id)));
    }
    let pid = recorded.pid;
    // Open the pidfd first: if the process checks out afterwards, the pidfd is that process.
    let pidfd = PidFd::open(pid).map_err(|e| gone(format!("pid {pid}: {e}")))?;
    match stat(pid) {
        None => return Err(gone(format!("pid {pid} has exited"))),
        Some(s) if s.zombie => {
            pidfd.reap();
            return Err(gone(format!("pid {pid} has exited")));
        }
        Some(s) if s.start_time != recorded.start_time => {
            return Err(gone(format!(
                "pid {pid} started at tick {}, not at the recorded {}: another process",
                s.start_time, recorded.start_time
            )))
        }
        Some(_) => {}
    }
    let args = cmdline(pid).unwrap_or_default();
    Ok((record, Found { pid, pidfd, args }))
}

/// SIGKILLs the process `pid` only if it is still the one that started at `start_time` (clock
/// ticks since boot, as from [`crate::Vm::start_time`]), waits for it to exit (up to 5 s), and
/// reaps it if it is this process's child. Returns whether it killed it; `Ok(false)` means that
/// process no longer runs (the pid is gone or belongs to another process now).
///
/// For the reconciler, to remove a VM it decides not to adopt. Blocks for as long as the process
/// takes to die: call it from `spawn_blocking` in async code.
pub fn kill_recorded(pid: u32, start_time: u64) -> Result<bool, VmmError> {
    let proc_path = format!("/proc/{pid}");
    let fd = match PidFd::open(pid) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(false),
        Err(e) => return Err(VmmError::io("open pidfd for", proc_path, e)),
    };
    match stat(pid) {
        Some(s) if s.start_time == start_time && s.zombie => {
            fd.reap();
            return Ok(false);
        }
        Some(s) if s.start_time == start_time => {}
        _ => return Ok(false),
    }
    fd.kill()
        .map_err(|e| VmmError::io("SIGKILL", &proc_path, e))?;
    if !fd.wait_exit(Duration::from_secs(5)) {
        return Err(VmmError::KillFailed { pid });
    }
    fd.reap();
    Ok(true)
}

/// A VMM process: our child, or a pidfd (adopted after a restart, or a jailed Firecracker that
/// is the jailer's child in its own PID namespace). Either way, signals reach exactly it.
pub(crate) enum Proc {
    /// Spawned by us.
    Child(Child),
    /// Known by pidfd.
    Pid(PidFd),
}

impl Proc {
    pub(crate) fn running(&mut self) -> bool {
        match self {
            Proc::Child(c) => matches!(c.try_wait(), Ok(None)),
            Proc::Pid(p) => !p.exited(),
        }
    }

    /// SIGKILL, exactly to this process (an unreaped child or a pidfd cannot hit a recycled pid).
    pub(crate) fn kill(&mut self) {
        let _ = match self {
            Proc::Child(c) => c.start_kill(),
            Proc::Pid(p) => p.kill(),
        };
    }

    /// Waits up to `limit` for the process to exit, and reaps it if it is our child.
    pub(crate) async fn wait(&mut self, limit: Duration) -> bool {
        match self {
            Proc::Child(c) => tokio::time::timeout(limit, c.wait()).await.is_ok(),
            Proc::Pid(p) => {
                let deadline = Instant::now() + limit;
                while !p.exited() {
                    if Instant::now() >= deadline {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                p.reap();
                true
            }
        }
    }

    /// As [`Proc::wait`], blocking the thread (for `Drop`).
    #[allow(clippy::disallowed_methods)] // `Drop` cannot await; only a VM dropped undestroyed.
    pub(crate) fn wait_blocking(&mut self, limit: Duration) -> bool {
        match self {
            Proc::Child(c) => {
                let deadline = Instant::now() + limit;
                while matches!(c.try_wait(), Ok(None)) {
                    if Instant::now() >= deadline {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                true
            }
            Proc::Pid(p) => {
                let exited = p.wait_exit(limit);
                p.reap();
                exited
            }
        }
    }
}

/// Removes a VM's run dir; one already gone is fine.
pub(crate) fn remove_run_dir(dir: &std::path::Path) -> Result<(), VmmError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(VmmError::io("remove run dir", dir, e)),
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // Tests spawn and reap processes synchronously.
mod tests {
    use super::*;

    fn sleeper() -> std::process::Child {
        std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap()
    }

    #[test]
    fn stat_of_self_and_of_nothing() {
        let me = stat(std::process::id()).unwrap();
        assert!(me.start_time > 0 && !me.zombie);
        assert_eq!(stat(u32::MAX / 2), None);
        assert!(cmdline(std::process::id()).unwrap()[0].contains("hutch_vmm"));
    }

    #[test]
    fn kill_recorded_checks_the_start_time() {
        let mut child = sleeper();
        let pid = child.id();
        let start = stat(pid).unwrap().start_time;
        assert!(!kill_recorded(pid, start + 1).unwrap(), "wrong start time");
        assert!(stat(pid).is_some_and(|s| !s.zombie), "must still run");
        assert!(kill_recorded(pid, start).unwrap());
        // Reaped by kill_recorded: the pid is gone and our handle finds no child.
        assert_eq!(stat(pid), None);
        assert!(child.try_wait().is_err());
        assert!(!kill_recorded(pid, start).unwrap(), "gone now");
    }

    #[test]
    fn pidfd_sees_exit() {
        let mut child = sleeper();
        let fd = PidFd::open(child.id()).unwrap();
        assert!(!fd.exited());
        fd.kill().unwrap();
        assert!(fd.wait_exit(Duration::from_secs(5)));
        let _ = child.wait();
        fd.kill().unwrap();
    }
}
