//! Shared folders on QEMU: one `virtiofsd` per share, serving a host directory to the guest's
//! `vhost-user-fs-device` over a socket in the VM's run dir (`fs<N>.sock`).
//!
//! Each virtiofsd is confined three ways, outermost first:
//!
//! * **its own mount namespace, set up by Hutch before exec**: the share's directory is
//!   bind-mounted onto itself `nosuid,nodev` (and `ro`, recursively, for a read-only share), so
//!   the kernel refuses every write to a read-only share whatever virtiofsd is asked;
//! * **a seccomp filter of Hutch's, installed before exec with `no_new_privs`**: `mknod` and
//!   `mknodat` fail with `EPERM` (no device nodes, FIFOs or sockets on the host), and so do
//!   `chmod`/`fchmod`/`fchmodat`/`fchmodat2`, `open`/`openat`/`creat` and `mkdir`/`mkdirat` whose
//!   mode carries `S_ISUID` or `S_ISGID` (no set-id files); `openat2`, whose mode Hutch cannot
//!   see, fails too;
//! * **virtiofsd's own sandbox** (`-o sandbox=namespace`): new mount, PID and network
//!   namespaces, `pivot_root` into the shared directory (so no path, and no guest-made symlink,
//!   resolves outside it), its own seccomp filter, and `CAP_MKNOD` dropped (`-o modcaps=-mknod`).
//!
//! Its life follows the VM's: started before QEMU with the VM's [`Lifetime`], recorded (pid and
//! start time) in the VM's `identity.json`, killed by exact identity (pidfd) after QEMU on
//! destroy, and found by `identity.json` or by its command line (a socket under the run dir) by
//! the orphan sweep after a crash.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::common::is_socket;
use crate::proc::{PidFd, Proc};
use crate::spawn::{apply_lifetime, StderrTail};
use crate::{Lifetime, VmmError};

/// Where Debian's virtiofsd lives (package `qemu-system-common` on bookworm, a dependency of
/// `qemu-system-x86`); `$HUTCH_VIRTIOFSD` overrides it.
pub const VIRTIOFSD_PATH: &str = "/usr/lib/qemu/virtiofsd";

/// How long a virtiofsd gets to create its socket.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a killed virtiofsd may take to die.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// A host directory shared into a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmShare {
    /// The virtio-fs tag the guest mounts it by (`mount -t virtiofs TAG DIR`): 1–36 bytes of
    /// `[a-z0-9-]`.
    pub tag: String,
    /// The host directory (absolute, canonical, an existing directory).
    pub host_dir: PathBuf,
    /// Whether the guest may write to it.
    pub writable: bool,
}

/// The virtiofsd binary: `$HUTCH_VIRTIOFSD`, else [`VIRTIOFSD_PATH`]; `None` if it is not there.
pub fn find_virtiofsd() -> Option<PathBuf> {
    let path = std::env::var_os("HUTCH_VIRTIOFSD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(VIRTIOFSD_PATH));
    path.is_file().then_some(path)
}

/// The socket of share number `i` in `run_dir`.
pub(crate) fn socket(run_dir: &Path, i: usize) -> PathBuf {
    run_dir.join(format!("fs{i}.sock"))
}

/// Checks the shares of a spec before anything is started.
pub(crate) fn check(shares: &[VmShare]) -> Result<(), VmmError> {
    let bad = |why: String| Err(VmmError::InvalidSpec(why));
    if shares.len() > hutch_types::MAX_SHARES {
        return bad(format!("more than {} shares", hutch_types::MAX_SHARES));
    }
    for (i, s) in shares.iter().enumerate() {
        let tag_ok = (1..=36).contains(&s.tag.len())
            && s.tag
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !tag_ok || shares[..i].iter().any(|o| o.tag == s.tag) {
            return bad(format!(
                "share tag {:?} is not a unique [a-z0-9-]{{1,36}}",
                s.tag
            ));
        }
        let dir = s.host_dir.to_str().unwrap_or(",");
        if !s.host_dir.is_absolute() || dir.contains(',') {
            return bad(format!(
                "share directory {} is not an absolute UTF-8 path without ','",
                s.host_dir.display()
            ));
        }
        if !std::fs::metadata(&s.host_dir).is_ok_and(|m| m.is_dir()) {
            return bad(format!(
                "share directory {} is not a directory",
                s.host_dir.display()
            ));
        }
    }
    if !shares.is_empty() && find_virtiofsd().is_none() {
        return Err(VmmError::NoVirtiofsd);
    }
    Ok(())
}

/// virtiofsd's arguments for `share`, serving on `socket`.
pub(crate) fn virtiofsd_args(share: &VmShare, socket: &Path) -> Vec<String> {
    let dir = share.host_dir.display();
    [
        format!("--socket-path={}", socket.display()),
        "-o".into(),
        format!("source={dir}"),
        "-o".into(),
        "sandbox=namespace".into(),
        "-o".into(),
        "modcaps=-mknod".into(),
        "-o".into(),
        "no_xattr".into(),
        "-o".into(),
        "no_posix_lock".into(),
        "-o".into(),
        "no_flock".into(),
        "-o".into(),
        "cache=auto".into(),
        "-o".into(),
        "log_level=warn".into(),
    ]
    .into()
}

/// `S_ISUID | S_ISGID`.
const SETID_BITS: u64 = 0o6000;

/// Hutch's own seccomp filter for virtiofsd (see the module docs): every other call is allowed,
/// virtiofsd's own filter decides about those.
pub(crate) fn filter() -> Result<BpfProgram, VmmError> {
    let err = VmmError::Seccomp;
    // One rule per set-id bit on argument `arg` (rules of a syscall are or-ed).
    let setid = |arg: u8| -> Result<Vec<SeccompRule>, VmmError> {
        [libc::S_ISUID as u64, libc::S_ISGID as u64]
            .into_iter()
            .map(|bit| {
                let cond = SeccompCondition::new(
                    arg,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::MaskedEq(bit),
                    bit,
                )
                .map_err(err)?;
                SeccompRule::new(vec![cond]).map_err(err)
            })
            .collect()
    };
    debug_assert_eq!(SETID_BITS, (libc::S_ISUID | libc::S_ISGID) as u64);
    let rules = [
        (libc::SYS_mknod, Vec::new()),
        (libc::SYS_mknodat, Vec::new()),
        (libc::SYS_openat2, Vec::new()),
        (libc::SYS_chmod, setid(1)?),
        (libc::SYS_fchmod, setid(1)?),
        (libc::SYS_fchmodat, setid(2)?),
        (libc::SYS_fchmodat2, setid(2)?),
        (libc::SYS_open, setid(2)?),
        (libc::SYS_creat, setid(1)?),
        (libc::SYS_openat, setid(3)?),
        (libc::SYS_mkdir, setid(1)?),
        (libc::SYS_mkdirat, setid(2)?),
    ]
    .into_iter()
    .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .map_err(err)?;
    filter.try_into().map_err(err)
}

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const AT_RECURSIVE: libc::c_uint = 0x8000;

/// What the child does between fork and exec. Everything is prepared before the fork.
struct Confine {
    dir: CString,
    read_only: bool,
    filter: BpfProgram,
}

impl Confine {
    /// Ignores SIGPIPE (a detached virtiofsd outlives the daemon reading its stderr), enters a
    /// private mount namespace whose bind mount of the share is `nosuid,nodev` (and `ro`),
    /// then installs the seccomp filter. Only async-signal-safe calls.
    fn apply(&self) -> std::io::Result<()> {
        let check = |rc: libc::c_long| match rc {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        };
        let dir = self.dir.as_ptr();
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_NOSUID
                | MOUNT_ATTR_NODEV
                | if self.read_only { MOUNT_ATTR_RDONLY } else { 0 },
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        // SAFETY: plain syscalls on NUL-terminated strings and a struct that live across them;
        // they change only this (forked, not yet exec'd) process.
        unsafe {
            if libc::signal(libc::SIGPIPE, libc::SIG_IGN) == libc::SIG_ERR {
                return Err(std::io::Error::last_os_error());
            }
            check(libc::unshare(libc::CLONE_NEWNS).into())?;
            let none = std::ptr::null();
            let root = c"/".as_ptr();
            check(
                libc::mount(
                    none,
                    root,
                    none,
                    libc::MS_REC | libc::MS_PRIVATE,
                    none.cast(),
                )
                .into(),
            )?;
            check(libc::mount(dir, dir, none, libc::MS_BIND | libc::MS_REC, none.cast()).into())?;
            check(libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                dir,
                AT_RECURSIVE,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            ))?;
        }
        seccompiler::apply_filter(&self.filter).map_err(std::io::Error::other)
    }
}

/// What `identity.json` records of each virtiofsd.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Helper {
    /// The share's tag.
    pub tag: String,
    /// Its pid.
    pub pid: u32,
    /// Its start time (clock ticks since boot).
    pub start_time: u64,
}

/// A running virtiofsd.
pub(crate) struct ShareProc {
    /// What identifies it.
    pub helper: Helper,
    proc: Proc,
}

impl std::fmt::Debug for ShareProc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.helper.fmt(f)
    }
}

/// Starts one virtiofsd per share and waits until each listens. On error, kills those started.
pub(crate) async fn start_all(
    shares: &[VmShare],
    run_dir: &Path,
    lifetime: Lifetime,
) -> Result<Vec<ShareProc>, VmmError> {
    let mut started = Vec::new();
    for (i, share) in shares.iter().enumerate() {
        match start(share, &socket(run_dir, i), lifetime).await {
            Ok(p) => started.push(p),
            Err(e) => {
                kill_all(&mut started).await;
                return Err(e);
            }
        }
    }
    Ok(started)
}

async fn start(share: &VmShare, socket: &Path, lifetime: Lifetime) -> Result<ShareProc, VmmError> {
    let program = find_virtiofsd().ok_or(VmmError::NoVirtiofsd)?;
    let confine = Confine {
        dir: CString::new(share.host_dir.as_os_str().as_bytes())
            .map_err(|_| VmmError::InvalidSpec("share directory has a NUL byte".into()))?,
        read_only: !share.writable,
        filter: filter()?,
    };
    let mut cmd = tokio::process::Command::new(&program);
    cmd.args(virtiofsd_args(share, socket))
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    apply_lifetime(&mut cmd, lifetime);
    cmd.stdout(Stdio::null());
    // SAFETY: `Confine::apply` makes only async-signal-safe syscalls on data prepared before
    // the fork.
    unsafe {
        cmd.pre_exec(move || confine.apply());
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| VmmError::io("spawn", &program, e))?;
    let pid = child.id().unwrap_or(0);
    let start_time = crate::proc::stat(pid).map_or(0, |s| s.start_time);
    let stderr = child.stderr.take().expect("stderr is piped");
    let (stderr, _drain) = StderrTail::collect(stderr);
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            return Err(VmmError::VirtiofsdExited {
                dir: share.host_dir.clone(),
                status: status.to_string(),
                stderr: stderr.one_line(),
            });
        }
        if is_socket(socket) {
            break;
        }
        if started.elapsed() > READY_TIMEOUT {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(KILL_TIMEOUT, child.wait()).await;
            return Err(VmmError::StartTimeout {
                what: socket.display().to_string(),
                secs: READY_TIMEOUT.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tracing::debug!(tag = %share.tag, pid, dir = %share.host_dir.display(), writable = share.writable, "virtiofsd started");
    Ok(ShareProc {
        helper: Helper {
            tag: share.tag.clone(),
            pid,
            start_time,
        },
        proc: Proc::Child(child),
    })
}

/// Finds the recorded virtiofsd processes of the VM in `run_dir` again (after a restart): each
/// alive, started at its recorded time, serving its socket in `run_dir`.
pub(crate) fn adopt(helpers: &[Helper], run_dir: &Path) -> Result<Vec<ShareProc>, String> {
    helpers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let pidfd = PidFd::open(h.pid).map_err(|e| format!("virtiofsd pid {}: {e}", h.pid))?;
            let alive =
                crate::proc::stat(h.pid).is_some_and(|s| !s.zombie && s.start_time == h.start_time);
            let arg = format!("--socket-path={}", socket(run_dir, i).display());
            let serves = crate::proc::cmdline(h.pid).is_some_and(|a| a.contains(&arg));
            if !(alive && serves) {
                return Err(format!(
                    "virtiofsd of share {} (pid {}) is gone",
                    h.tag, h.pid
                ));
            }
            Ok(ShareProc {
                helper: h.clone(),
                proc: Proc::Pid(pidfd),
            })
        })
        .collect()
}

/// SIGKILLs each virtiofsd (exactly it) and reaps it, bounded.
pub(crate) async fn kill_all(procs: &mut Vec<ShareProc>) {
    for p in procs.iter_mut() {
        p.proc.kill();
    }
    for mut p in procs.drain(..) {
        if !p.proc.wait(KILL_TIMEOUT).await {
            tracing::warn!(pid = p.helper.pid, "virtiofsd did not die");
        }
    }
}

/// As [`kill_all`], blocking (for `Drop`).
pub(crate) fn kill_all_blocking(procs: &mut Vec<ShareProc>) {
    for mut p in procs.drain(..) {
        p.proc.kill();
        p.proc.wait_blocking(Duration::from_secs(2));
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // Tests run and wait for processes synchronously.
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;

    fn share(dir: &Path, writable: bool) -> VmShare {
        VmShare {
            tag: "hutch-share-0".into(),
            host_dir: dir.into(),
            writable,
        }
    }

    #[test]
    fn virtiofsd_runs_sandboxed_without_mknod() {
        let args =
            virtiofsd_args(&share(Path::new("/srv/x"), true), Path::new("/r/fs0.sock")).join(" ");
        for want in [
            "--socket-path=/r/fs0.sock",
            "-o source=/srv/x",
            "-o sandbox=namespace",
            "-o modcaps=-mknod",
            "-o no_xattr",
        ] {
            assert!(args.contains(want), "{want:?} missing in {args}");
        }
    }

    #[test]
    fn checks_tags_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let ok = share(dir.path(), false);
        let mut bad_tag = ok.clone();
        bad_tag.tag = "Bad Tag".into();
        let mut twice = ok.clone();
        twice.host_dir = "/".into();
        let mut missing = ok.clone();
        missing.host_dir = dir.path().join("nope");
        let mut comma = ok.clone();
        comma.host_dir = "/a,b".into();
        for bad in [
            vec![bad_tag],
            vec![ok.clone(), twice],
            vec![missing],
            vec![comma],
        ] {
            assert!(
                matches!(check(&bad), Err(VmmError::InvalidSpec(_))),
                "{bad:?}"
            );
        }
    }

    /// Runs `script` under `sh` confined as virtiofsd would be (mount namespace and seccomp
    /// filter, no virtiofsd), in `dir`; returns its exit status and stderr.
    fn confined(dir: &Path, read_only: bool, script: &str) -> (bool, String) {
        let confine = Confine {
            dir: CString::new(dir.as_os_str().as_bytes()).unwrap(),
            read_only,
            filter: filter().unwrap(),
        };
        // `cd` after the mounts: a cwd set by `Command` is entered before `pre_exec` runs, on
        // the mount outside the namespace.
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.args(["-c", &format!("cd \"$0\" && {script}")]).arg(dir);
        // SAFETY: as in `start`.
        unsafe {
            cmd.pre_exec(move || confine.apply());
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into(),
        )
    }

    /// Needs root (a mount namespace), as virtiofsd itself does.
    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn the_filter_refuses_device_nodes_fifos_and_setid_modes() {
        if !root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // What still works: plain files, directories, modes without set-id bits.
        let (ok, err) = confined(
            d,
            false,
            "echo x > f && chmod 0755 f && mkdir sub && touch sub/g",
        );
        assert!(ok, "{err}");
        assert_eq!(
            std::fs::metadata(d.join("f")).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        for (script, name) in [
            ("mkfifo p", "p"),
            ("mknod n c 1 3", "n"),
            ("mknod b b 7 0", "b"),
        ] {
            let (ok, err) = confined(d, false, script);
            assert!(
                !ok && err.contains("Operation not permitted"),
                "{script}: {err}"
            );
            assert!(!d.join(name).exists(), "{script} made {name}");
        }
        for script in [
            "chmod u+s f",
            "chmod g+s f",
            "chmod 4755 f",
            "chmod 2755 sub",
        ] {
            let (ok, err) = confined(d, false, script);
            assert!(
                !ok && err.contains("Operation not permitted"),
                "{script}: {err}"
            );
        }
        assert_eq!(
            std::fs::metadata(d.join("f")).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        assert_eq!(
            std::fs::metadata(d.join("sub"))
                .unwrap()
                .permissions()
                .mode()
                & 0o6000,
            0
        );
        // python's os.open passes the mode straight to openat.
        let (ok, _) = confined(
            d,
            false,
            "python3 -c 'import os; os.open(\"s\", os.O_CREAT|os.O_WRONLY, 0o4755)'",
        );
        assert!(
            !ok && !d.join("s").exists(),
            "openat with S_ISUID created a file"
        );
    }

    #[test]
    fn a_read_only_share_is_read_only_in_its_namespace_only() {
        if !root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("f"), "host").unwrap();
        let (ok, err) = confined(d, true, "cat f && echo guest > f");
        assert!(!ok && err.contains("Read-only file system"), "{err}");
        assert_eq!(std::fs::read_to_string(d.join("f")).unwrap(), "host");
        // The host's own view stays writable: the ro mount lived in the child's namespace.
        std::fs::write(d.join("f"), "host2").unwrap();
    }
}
