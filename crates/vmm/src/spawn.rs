//! Spawning VMM processes (tied to Hutch, or detached from it), and capturing their stderr with a
//! bound.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStderr, Command};
use tokio::task::JoinHandle;

use crate::{Lifetime, VmmError};

/// How much of a VMM's stderr is kept. The guest can provoke QEMU warnings, so this is bounded.
const STDERR_KEEP: usize = 16 * 1024;

/// Spawns `program args…` with stdin from /dev/null and stdout/stderr piped, in its own process
/// group (a terminal's Ctrl-C goes to Hutch, which decides), with `kill_on_drop`, and with
/// `PR_SET_PDEATHSIG(SIGKILL)` so the kernel kills it if Hutch dies.
///
/// Note: Linux sends the death signal when the *thread* that forked exits. Tokio's worker threads
/// and `block_on` threads live as long as the runtime, which is what we want; do not call this
/// from a short-lived thread.
pub(crate) fn spawn_guarded(program: &Path, args: &[String]) -> Result<Child, VmmError> {
    spawn(program, args, Lifetime::Owned, None)
}

/// Spawns a VMM process. [`Lifetime::Owned`]: as [`spawn_guarded`]. [`Lifetime::Detached`]: in a
/// session of its own (no terminal, no signals meant for Hutch's group), no death signal, no
/// `kill_on_drop`, stdin and stdout on /dev/null; only stderr is piped, for start-up errors
/// (QEMU ignores SIGPIPE, so a write there after Hutch is gone fails harmlessly).
///
/// `inherit`: a descriptor the program must inherit under the same number. It must be
/// close-on-exec in this process (so no other child, spawned by any thread, ever gets it); only
/// the child clears the flag, between fork and exec.
pub(crate) fn spawn(
    program: &Path,
    args: &[String],
    lifetime: Lifetime,
    inherit: Option<BorrowedFd<'_>>,
) -> Result<Child, VmmError> {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stderr(Stdio::piped());
    if let Some(fd) = inherit {
        let fd = fd.as_raw_fd();
        // SAFETY: runs between fork and exec and only makes an async-signal-safe syscall on a
        // descriptor the caller keeps open across the spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    apply_lifetime(&mut cmd, lifetime);
    cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            VmmError::QemuNotFound
        } else {
            VmmError::io("spawn", program, e)
        }
    })
}

/// The first [`STDERR_KEEP`] bytes of a process's stderr, collected in the background.
#[derive(Clone, Default)]
pub(crate) struct StderrTail(Arc<Mutex<Vec<u8>>>);

impl StderrTail {
    /// Starts draining `stderr` (all of it, so the process never blocks), keeping the start.
    pub(crate) fn collect(stderr: ChildStderr) -> (Self, JoinHandle<()>) {
        let tail = StderrTail::default();
        let buf = tail.0.clone();
        let task = tokio::spawn(async move {
            let mut stderr = stderr;
            let mut chunk = [0u8; 4096];
            loop {
                match stderr.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut b = buf.lock().unwrap_or_else(|p| p.into_inner());
                        let room = STDERR_KEEP.saturating_sub(b.len());
                        b.extend_from_slice(&chunk[..n.min(room)]);
                    }
                }
            }
        });
        (tail, task)
    }

    /// The collected stderr condensed to one line: QEMU's `qemu-system-x86_64: ` prefixes
    /// dropped, lines joined with `; `, non-printable characters replaced, at most 400 chars.
    pub(crate) fn one_line(&self) -> String {
        let b = self.0.lock().unwrap_or_else(|p| p.into_inner());
        condense(&String::from_utf8_lossy(&b))
    }
}

pub(crate) fn condense(text: &str) -> String {
    let joined = text
        .lines()
        .map(|l| {
            let l = l.trim();
            l.strip_prefix("qemu-system-x86_64: ")
                .or_else(|| l.strip_prefix("qemu: "))
                .unwrap_or(l)
        })
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let mut out: String = joined
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(400)
        .collect();
    if out.is_empty() {
        out.push_str("no output on stderr");
    }
    out
}

/// Ties a VMM process's life to `lifetime`: an owned one dies with the process that spawned it
/// (death signal, its own process group, killed when its handle drops) and its stdout is piped
/// for the console; a detached one gets its own session and outlives us.
pub(crate) fn apply_lifetime(cmd: &mut tokio::process::Command, lifetime: Lifetime) {
    match lifetime {
        Lifetime::Owned => {
            cmd.stdout(Stdio::piped())
                .kill_on_drop(true)
                .process_group(0);
            let parent = std::process::id() as libc::pid_t;
            // SAFETY: runs between fork and exec and only makes async-signal-safe syscalls.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The parent may have died between fork and prctl: then nobody will ever
                    // kill us.
                    if libc::getppid() != parent {
                        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                    }
                    Ok(())
                });
            }
        }
        Lifetime::Detached => {
            cmd.stdout(Stdio::null());
            // SAFETY: as above.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    /// The descriptor reaches the spawned program under its number, and only that program.
    #[tokio::test]
    async fn inherits_exactly_the_named_descriptor() {
        let (a, b) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let check = |fd: i32| vec!["-c".to_string(), format!("test -e /proc/self/fd/{fd}")];
        let sh = Path::new("/bin/sh");
        let status = |mut c: Child| async move { c.wait().await.unwrap().code() };
        let fd = a.as_raw_fd();
        let with = spawn(sh, &check(fd), Lifetime::Owned, Some(a.as_fd())).unwrap();
        assert_eq!(status(with).await, Some(0), "fd {fd} not inherited");
        // A sibling spawned without it (e.g. by another thread at the same time) never has it.
        let without = spawn(sh, &check(fd), Lifetime::Detached, None).unwrap();
        assert_eq!(status(without).await, Some(1), "fd {fd} leaked");
        // The flag was cleared in the child only.
        let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
        drop(b);
    }

    #[test]
    fn condenses_qemu_stderr() {
        let s = "qemu-system-x86_64: could not load kernel '/nope': No such file or directory\n\n";
        assert_eq!(
            condense(s),
            "could not load kernel '/nope': No such file or directory"
        );
        assert_eq!(condense("a\nb\x1b[31m\n"), "a; b?[31m");
        assert_eq!(condense(""), "no output on stderr");
        assert_eq!(condense(&"x".repeat(1000)).len(), 400);
    }
}
