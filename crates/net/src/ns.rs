//! Namespace plumbing that must run on a dedicated OS thread: `setns`/`unshare` change the
//! calling thread's namespace, so they never run on a tokio worker. Each operation gets a fresh,
//! short-lived thread that enters the namespace, runs one closure and exits, so no thread is
//! ever reused in the wrong namespace.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Once;

use crate::NetError;

/// Directory holding named network namespaces (the same layout as `ip netns`).
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Path of a named network namespace.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Io { what, source }
}

fn last_os(what: impl Into<String>) -> NetError {
    NetError::Io {
        what: what.into(),
        source: io::Error::last_os_error(),
    }
}

/// Enters the network namespace at `path` on the *current* thread. Only for ns worker threads.
fn enter(path: &Path) -> Result<(), NetError> {
    let f = File::open(path).map_err(io_err(format!("open {}", path.display())))?;
    // SAFETY: plain syscall on a valid fd.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(last_os(format!("setns {}", path.display())));
    }
    Ok(())
}

/// Runs `f` on a fresh OS thread inside the namespace `ns` (or the caller's namespace when
/// `None`) and waits for it synchronously.
#[allow(clippy::disallowed_methods)] // Joins its thread: async callers use `run_in`.
pub fn run_in_sync<T, F>(ns: Option<&Path>, f: F) -> Result<T, NetError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, NetError> + Send + 'static,
{
    let ns = ns.map(Path::to_path_buf);
    std::thread::Builder::new()
        .name("hutch-netns".into())
        .spawn(move || {
            if let Some(ns) = ns {
                enter(&ns)?;
            }
            f()
        })
        .map_err(io_err("spawn ns worker"))?
        .join()
        .map_err(|_| NetError::Worker)?
}

/// Async form of [`run_in_sync`]: the tokio worker only awaits a channel.
pub async fn run_in<T, F>(ns: Option<&Path>, f: F) -> Result<T, NetError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, NetError> + Send + 'static,
{
    Parked::start(ns)?.run(f).await
}

/// What a [`Parked`] thread runs, given whether it entered its namespace.
type Job = Box<dyn FnOnce(Result<(), NetError>) + Send>;

/// A fresh OS thread that has entered a namespace and waits for the one job it will run (then
/// it exits; dropped unused, it exits at once). A spare network keeps one, so handing it out
/// costs a wake-up instead of starting a thread.
pub struct Parked {
    job: std::sync::mpsc::Sender<Job>,
}

impl Parked {
    /// Starts the thread inside the namespace at `ns` (or the caller's when `None`).
    pub fn start(ns: Option<&Path>) -> Result<Parked, NetError> {
        let ns = ns.map(Path::to_path_buf);
        let (job, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("hutch-netns".into())
            .spawn(move || {
                let entered = match &ns {
                    Some(ns) => enter(ns),
                    None => Ok(()),
                };
                if let Ok(job) = rx.recv() {
                    job(entered);
                }
            })
            .map_err(io_err("spawn ns worker"))?;
        Ok(Parked { job })
    }

    /// Runs `f` on the thread (if it entered its namespace) and returns its result.
    pub async fn run<T, F>(self, f: F) -> Result<T, NetError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, NetError> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |entered| {
            let _ = tx.send(entered.and_then(|()| f()));
        });
        self.job.send(job).map_err(|_| NetError::Worker)?;
        rx.await.map_err(|_| NetError::Worker)?
    }
}

/// Makes `/run/netns` a shared mount point, as `ip netns add` does, so namespaces bound there
/// are visible in every mount namespace. Idempotent; the first error is reported each time.
pub fn prepare_run_dir() -> Result<(), NetError> {
    static ONCE: Once = Once::new();
    static mut RESULT: Option<i32> = None;
    ONCE.call_once(|| {
        let r = (|| -> io::Result<()> {
            std::fs::create_dir_all(NETNS_RUN_DIR)?;
            let dir = CString::new(NETNS_RUN_DIR).unwrap();
            let none = CString::new("none").unwrap();
            let empty = CString::new("").unwrap();
            let mut bound = false;
            loop {
                // SAFETY: valid C strings.
                let rc = unsafe {
                    libc::mount(
                        empty.as_ptr(),
                        dir.as_ptr(),
                        none.as_ptr(),
                        libc::MS_SHARED | libc::MS_REC,
                        std::ptr::null(),
                    )
                };
                if rc == 0 {
                    return Ok(());
                }
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINVAL) || bound {
                    return Err(e);
                }
                // Not a mount point yet: bind it onto itself, then retry.
                // SAFETY: `dir` and `none` are valid NUL-terminated strings mount only reads.
                let rc = unsafe {
                    libc::mount(
                        dir.as_ptr(),
                        dir.as_ptr(),
                        none.as_ptr(),
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    )
                };
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
                bound = true;
            }
        })();
        // SAFETY: written once inside call_once, read only after it.
        unsafe { RESULT = r.err().map(|e| e.raw_os_error().unwrap_or(libc::EIO)) };
    });
    // SAFETY: see above.
    match unsafe { RESULT } {
        None => Ok(()),
        Some(code) => Err(NetError::Io {
            what: format!("make {NETNS_RUN_DIR} a shared mount"),
            source: io::Error::from_raw_os_error(code),
        }),
    }
}

/// On an ns worker thread: creates a new network namespace, enters it and binds it to
/// `/run/netns/<name>`. Fails with `EEXIST` if the name is taken (never adopts a stranger's).
pub fn create_and_enter(name: &str) -> Result<(), NetError> {
    // SAFETY: plain syscall; affects only this thread's network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(last_os("unshare(CLONE_NEWNET)"));
    }
    bind_new(Path::new("/proc/thread-self/ns/net"), &netns_path(name))
}

/// Binds the namespace `/run/netns/<from>` to `/run/netns/<to>` as well (failing with `EEXIST`
/// if `to` is taken), then removes `from`: the namespace is renamed, nothing in it changes.
pub fn rename(from: &str, to: &str) -> Result<(), NetError> {
    bind_new(&netns_path(from), &netns_path(to))?;
    remove(from).map(drop)
}

/// Creates the file `dst` (`EEXIST` if it is there: a leftover or foreign namespace is never
/// taken over) and bind-mounts the namespace file `src` onto it.
fn bind_new(src: &Path, dst: &Path) -> Result<(), NetError> {
    let csrc = CString::new(src.as_os_str().as_encoded_bytes()).unwrap();
    let cdst = CString::new(dst.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid C string; O_EXCL refuses a name in use.
    let fd = unsafe {
        libc::open(
            cdst.as_ptr(),
            libc::O_RDONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
            0o444,
        )
    };
    if fd < 0 {
        return Err(last_os(format!("create {}", dst.display())));
    }
    // SAFETY: fd was just opened.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    let none = CString::new("none").unwrap();
    // SAFETY: valid C strings.
    let rc = unsafe {
        libc::mount(
            csrc.as_ptr(),
            cdst.as_ptr(),
            none.as_ptr(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = last_os(format!("bind-mount {} to {}", src.display(), dst.display()));
        let _ = std::fs::remove_file(dst);
        return Err(e);
    }
    Ok(())
}

/// Unmounts and removes `/run/netns/<name>`. Returns `Ok(false)` if it did not exist.
/// The namespace itself dies once nothing (a process, a TAP fd, a socket) holds it any more.
pub fn remove(name: &str) -> Result<bool, NetError> {
    let path = netns_path(name);
    let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOENT) => return Ok(false),
            // Not a mount point (half-created): still remove the file below.
            Some(libc::EINVAL) => {}
            _ => {
                return Err(NetError::Io {
                    what: format!("unmount {}", path.display()),
                    source: e,
                })
            }
        }
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(NetError::Io {
            what: format!("remove {}", path.display()),
            source: e,
        }),
    }
}

/// Names under `/run/netns` starting with `prefix`.
pub fn list(prefix: &str) -> Result<Vec<String>, NetError> {
    let rd = match std::fs::read_dir(NETNS_RUN_DIR) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(format!("read {NETNS_RUN_DIR}"))(e)),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(io_err(format!("read {NETNS_RUN_DIR}")))?;
        if let Some(n) = ent.file_name().to_str() {
            if n.starts_with(prefix) {
                out.push(n.to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Writes a sysctl of the calling thread's network namespace (e.g. `net/ipv4/ip_forward`).
pub fn write_sysctl(key: &str, value: &str) -> Result<(), NetError> {
    let path = format!("/proc/sys/{key}");
    std::fs::write(&path, value).map_err(io_err(format!("write {path}")))
}

/// Opens a new `NETLINK_ROUTE` socket in the calling thread's namespace. The socket stays bound
/// to that namespace wherever it is used afterwards.
pub fn netlink_socket() -> Result<OwnedFd, NetError> {
    use std::os::fd::IntoRawFd;
    let s = rtnetlink::sys::Socket::new(rtnetlink::sys::protocols::NETLINK_ROUTE)
        .map_err(io_err("open netlink socket"))?;
    // SAFETY: fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(s.into_raw_fd()) })
}

/// Opens a namespace file so its fd can be handed to netlink (`IFLA_NET_NS_FD`).
pub fn open_netns(name: &str) -> Result<File, NetError> {
    let p = netns_path(name);
    File::open(&p).map_err(io_err(format!("open {}", p.display())))
}
