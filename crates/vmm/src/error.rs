//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong starting, talking to or stopping a VM.
///
/// Messages are short and do not repeat their `source`; print the whole chain
/// (`err: source: source…`) for a one-line diagnosis.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmmError {
    /// The QEMU binary is not installed (or `HUTCH_QEMU` points nowhere).
    #[error("qemu-system-x86_64 not found: install it with apt-get install qemu-system-x86")]
    QemuNotFound,

    /// virtiofsd (for shared folders) is not installed.
    #[error("virtiofsd not found at /usr/lib/qemu/virtiofsd (or $HUTCH_VIRTIOFSD): shared folders need it; install it with apt-get install qemu-system-common")]
    NoVirtiofsd,

    /// The backend has no virtio-fs, so no shared folders.
    #[error("shared folders need virtio-fs, which {backend} does not have: run the daemon with --backend qemu, or give the sandbox host files as a task workspace (hutch task run --workspace DIR)")]
    NoShares {
        /// The backend's name.
        backend: &'static str,
    },

    /// A share's virtiofsd exited while starting.
    #[error("virtiofsd for {dir} exited ({status}): {stderr}")]
    VirtiofsdExited {
        /// The shared directory.
        dir: PathBuf,
        /// Its exit status.
        status: String,
        /// Its stderr, condensed.
        stderr: String,
    },

    /// Hutch's seccomp filter for virtiofsd could not be built.
    #[error("cannot build the seccomp filter for virtiofsd")]
    Seccomp(#[source] seccompiler::BackendError),

    /// `mkfs.ext4` is not installed.
    #[error("mkfs.ext4 not found: install it with apt-get install e2fsprogs")]
    MkfsNotFound,

    /// The VM id cannot be used in host object names.
    #[error("invalid VM id {id:?}: {why}")]
    InvalidId {
        /// The offending id (truncated).
        id: String,
        /// What is wrong with it.
        why: &'static str,
    },

    /// The backend cannot do this.
    #[error("this VMM backend does not support {0}")]
    Unsupported(&'static str),

    /// Saving or restoring a snapshot failed.
    #[error("snapshot of VM {id} failed: {detail}")]
    Snapshot {
        /// The VM.
        id: String,
        /// What went wrong.
        detail: String,
    },

    /// Some other field of the spec is unusable.
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),

    /// An input file (kernel, initrd, rootfs) cannot be read.
    #[error("{what} {path} is not readable")]
    InputFile {
        /// Which input: `kernel`, `initrd` or `rootfs`.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },

    /// The run directory exists already (another VM's, or a leak): refuse to share it.
    #[error("run dir {0} already exists")]
    RunDirExists(PathBuf),

    /// A Unix socket path would not fit in `sockaddr_un`.
    #[error("socket path {path} is {len} bytes, over the {max}-byte limit of Unix sockets: use a shorter run dir")]
    SocketPathTooLong {
        /// The socket path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The limit (107 bytes plus the terminating NUL).
        max: usize,
    },

    /// A filesystem or process operation on the host failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done, e.g. `create run dir`.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },

    /// `mkfs.ext4` failed to format the scratch disk.
    #[error("mkfs.ext4 failed on {path}: {detail}")]
    Mkfs {
        /// The scratch disk file.
        path: PathBuf,
        /// Exit status and (truncated) stderr.
        detail: String,
    },

    /// The VMM process exited before it was ready.
    #[error("qemu exited during start ({status}): {stderr}")]
    QemuExited {
        /// Its exit status.
        status: String,
        /// Its stderr, condensed to one line.
        stderr: String,
    },

    /// The VMM did not become ready in time.
    #[error("qemu did not create {what} within {secs}s")]
    StartTimeout {
        /// What it failed to create.
        what: String,
        /// The bound.
        secs: u64,
    },

    /// Connecting to the guest channel's host end failed.
    #[error("connect to guest channel {path}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },

    /// The VM has been stopped already.
    #[error("VM {0} is not running")]
    NotRunning(String),

    /// A detached VM to adopt is not running: no record of it, its process is gone, or the
    /// recorded pid now belongs to another process.
    #[error("VM {id} in {run_dir} is not running: {why}")]
    Gone {
        /// The VM's id.
        id: String,
        /// Its run dir.
        run_dir: PathBuf,
        /// What was found instead.
        why: String,
    },

    /// The VM to adopt runs, but is an owned VM (its console is its starter's pipe).
    #[error("VM {0} was not started detached: it cannot be adopted")]
    NotDetached(String),

    /// A QMP command failed, or did not leave the VM in the expected state.
    #[error("QMP {command} on VM {id}")]
    Qmp {
        /// The VM's id.
        id: String,
        /// The command, e.g. `stop`.
        command: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },

    /// The VMM process could not be stopped.
    #[error("qemu pid {pid} did not exit after SIGKILL")]
    KillFailed {
        /// Its pid.
        pid: u32,
    },

    /// The Firecracker backend failed (its API's `fault_message` is in the chain).
    #[error(transparent)]
    Firecracker(#[from] crate::firecracker::FirecrackerError),
}

impl VmmError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        VmmError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
