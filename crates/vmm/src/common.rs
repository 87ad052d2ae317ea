//! What both backends' VMs share: the run dir's creation and socket-path checks, the identity
//! record, and [`VmCore`] — the id, the process by exact identity, the background tasks, and
//! the tail of `destroy` and `Drop`. Each backend keeps only what differs (how it asks its VMM
//! to stop, what else it removes).

use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::proc::Proc;
use crate::spawn::StderrTail;
use crate::{Lifetime, VmmError};

/// Longest Unix socket path (`sun_path` is 108 bytes with its NUL).
const SUN_PATH_MAX: usize = 107;
/// How long a killed VMM may take to die before destroy gives up.
pub(crate) const REAP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a finished VM's background tasks may take to drain.
const TASKS_TIMEOUT: Duration = Duration::from_secs(2);

/// `dir` made absolute, with every socket of `socket_names` in it checked against the Unix
/// socket path limit, so a long run dir fails before anything is created.
pub(crate) fn run_dir(dir: &Path, socket_names: &[&str]) -> Result<PathBuf, VmmError> {
    let dir = std::path::absolute(dir).map_err(|e| VmmError::io("resolve", dir, e))?;
    for name in socket_names {
        let sock = dir.join(name);
        let len = sock.as_os_str().len();
        if len > SUN_PATH_MAX {
            return Err(VmmError::SocketPathTooLong {
                path: sock,
                len,
                max: SUN_PATH_MAX,
            });
        }
    }
    Ok(dir)
}

/// A run dir being set up: removed on drop unless [`RunDirGuard::keep`] is called, so every
/// error path of a start cleans up.
pub(crate) struct RunDirGuard(Option<PathBuf>);

impl RunDirGuard {
    /// Creates the run dir `dir` (mode 0700; refusing an existing one) and guards it.
    pub(crate) fn create(dir: &Path) -> Result<RunDirGuard, VmmError> {
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| VmmError::io("create parent of run dir", parent, e))?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => Ok(RunDirGuard(Some(dir.to_path_buf()))),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(VmmError::RunDirExists(dir.to_path_buf()))
            }
            Err(e) => Err(VmmError::io("create run dir", dir, e)),
        }
    }

    /// The VM is up: its handle owns the run dir from now on.
    pub(crate) fn keep(&mut self) {
        self.0 = None;
    }
}

impl Drop for RunDirGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// Writes a backend's identity `record` to `path` (mode 0600) atomically: a crash leaves the
/// old record or the new one, never half of one.
pub(crate) fn write_identity<T: serde::Serialize>(path: &Path, record: &T) -> Result<(), VmmError> {
    let json = serde_json::to_vec(record).expect("serializes");
    let tmp = path.with_extension("json.tmp");
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| VmmError::io("write", path, e))
}

/// Checks that an input file of the VM (`what`: kernel, initrd, …) can be opened, before
/// anything is started.
pub(crate) fn check_readable(what: &'static str, path: &Path) -> Result<(), VmmError> {
    std::fs::File::open(path)
        .map(|_| ())
        .map_err(|source| VmmError::InputFile {
            what,
            path: path.to_path_buf(),
            source,
        })
}

/// Whether `p` is a Unix socket (following a symlink: a jailed VM's run dir links to the jail's
/// sockets).
pub(crate) fn is_socket(p: &Path) -> bool {
    std::fs::metadata(p)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

/// The part of a VM handle that does not depend on the backend.
pub(crate) struct VmCore {
    /// The VM's id.
    pub(crate) id: String,
    /// The VMM's pid, as recorded.
    pub(crate) pid: u32,
    /// The VMM's start time (clock ticks since boot), as recorded.
    pub(crate) start_time: u64,
    /// Whether the VM dies with its handle.
    pub(crate) lifetime: Lifetime,
    /// The run dir.
    pub(crate) dir: PathBuf,
    /// The capped console log in the run dir.
    pub(crate) console: PathBuf,
    /// `None` once reaped by `destroy` or `Drop`.
    proc: Mutex<Option<Proc>>,
    /// The console copier and stderr collector.
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The VMM's stderr so far (empty for an adopted VM).
    pub(crate) stderr: StderrTail,
}

impl std::fmt::Debug for VmCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmCore")
            .field("id", &self.id)
            .field("pid", &self.pid)
            .field("start_time", &self.start_time)
            .field("lifetime", &self.lifetime)
            .field("run_dir", &self.dir)
            .finish()
    }
}

/// Who the VM is and where it lives: what [`VmCore::new`] needs besides its process.
pub(crate) struct VmIdentity<'a> {
    /// The VM's id.
    pub id: &'a str,
    /// The VMM's pid.
    pub pid: u32,
    /// The VMM's start time.
    pub start_time: u64,
    /// Owned or detached.
    pub lifetime: Lifetime,
    /// The run dir.
    pub dir: &'a Path,
}

impl VmCore {
    /// A handle on the running VMM `proc`, with its background `tasks`.
    pub(crate) fn new(
        who: VmIdentity<'_>,
        proc: Proc,
        tasks: Vec<JoinHandle<()>>,
        stderr: StderrTail,
    ) -> Self {
        Self {
            id: who.id.to_string(),
            pid: who.pid,
            start_time: who.start_time,
            lifetime: who.lifetime,
            dir: who.dir.to_path_buf(),
            console: who.dir.join("console.log"),
            proc: Mutex::new(Some(proc)),
            tasks: Mutex::new(tasks),
            stderr,
        }
    }

    /// A handle on a detached VM found again after a restart (`found` by its identity record,
    /// which said it started at `start_time`), with its background `tasks`.
    pub(crate) fn adopted(
        id: &str,
        dir: &Path,
        start_time: u64,
        found: crate::proc::Found,
        tasks: Vec<JoinHandle<()>>,
    ) -> Self {
        let who = VmIdentity {
            id,
            pid: found.pid,
            start_time,
            lifetime: Lifetime::Detached,
            dir,
        };
        Self::new(who, Proc::Pid(found.pidfd), tasks, StderrTail::default())
    }

    /// Whether the VMM process has exited (or was reaped).
    pub(crate) fn has_exited(&self) -> bool {
        let mut proc = self.proc.lock().unwrap_or_else(|p| p.into_inner());
        !proc.as_mut().is_some_and(Proc::running)
    }

    /// [`VmmError::NotRunning`] once the VMM has exited.
    pub(crate) fn check_running(&self) -> Result<(), VmmError> {
        match self.has_exited() {
            true => Err(VmmError::NotRunning(self.id.clone())),
            false => Ok(()),
        }
    }

    /// Ends the VMM: `ask` asks it to stop (QMP quit, Ctrl-Alt-Del) and it gets `grace` to
    /// exit; then SIGKILL, exactly to this process, and a bounded reap; then the background
    /// tasks drain. A process that will not die stays held for a later destroy or `Drop`.
    pub(crate) async fn end<F>(&mut self, ask: F, grace: Duration) -> Result<(), VmmError>
    where
        F: Future<Output = Result<(), String>>,
    {
        let slot = self.proc.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(mut proc) = slot.take() {
            if proc.running() {
                match ask.await {
                    Ok(()) if proc.wait(grace).await => {
                        tracing::debug!(id = %self.id, "VMM stopped when asked")
                    }
                    Ok(()) => tracing::debug!(id = %self.id, "VMM did not stop when asked"),
                    Err(e) => {
                        tracing::debug!(id = %self.id, error = %e, "asking the VMM to stop failed")
                    }
                }
            }
            if proc.running() {
                proc.kill();
                if !proc.wait(REAP_TIMEOUT).await {
                    *slot = Some(proc);
                    return Err(VmmError::KillFailed { pid: self.pid });
                }
            }
            // Reap an exited child (or adopted child of ours) that was not waited for yet.
            proc.wait(Duration::ZERO).await;
        }
        self.drain_tasks().await;
        Ok(())
    }

    /// Waits (bounded) for the background tasks, which end at EOF once the VMM is gone; aborts
    /// any a grandchild still holds open.
    async fn drain_tasks(&mut self) {
        let tasks = std::mem::take(self.tasks.get_mut().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout(TASKS_TIMEOUT, t).await.is_err() {
                abort.abort();
            }
        }
    }

    /// SIGKILLs the process, reaps it (bounded) and stops the tasks: for a start that failed
    /// half-way.
    pub(crate) async fn kill_now(&mut self) {
        let proc = self
            .proc
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut p) = proc {
            p.kill();
            p.wait(REAP_TIMEOUT).await;
        }
        self.abort_tasks();
    }

    /// Aborts the background tasks.
    fn abort_tasks(&mut self) {
        let tasks = self.tasks.get_mut().unwrap_or_else(|p| p.into_inner());
        tasks.drain(..).for_each(|t| t.abort());
    }

    /// What dropping the handle does first: stops the background tasks; an owned VM is
    /// SIGKILLed and reaped (up to 2 s) and `true` says the caller should go on removing its
    /// files; a detached one is only let go, for a later adopter (tokio reaps an un-waited
    /// detached child once it exits).
    pub(crate) fn release(&mut self) -> bool {
        self.abort_tasks();
        if self.lifetime == Lifetime::Detached {
            return false;
        }
        let proc = self.proc.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(mut proc) = proc.take() {
            if proc.running() {
                tracing::warn!(id = %self.id, pid = self.pid, "VM dropped without destroy: killing it");
                proc.kill();
                proc.wait_blocking(Duration::from_secs(2));
            }
        }
        true
    }
}

/// The `Vm` getters every backend answers from its [`VmCore`] (a field named `core`).
macro_rules! vm_core_getters {
    () => {
        fn id(&self) -> &str {
            &self.core.id
        }

        fn pid(&self) -> u32 {
            self.core.pid
        }

        fn start_time(&self) -> u64 {
            self.core.start_time
        }

        fn run_dir(&self) -> &std::path::Path {
            &self.core.dir
        }

        fn console_log(&self) -> &std::path::Path {
            &self.core.console
        }

        fn has_exited(&self) -> bool {
            self.core.has_exited()
        }
    };
}
pub(crate) use vm_core_getters;
