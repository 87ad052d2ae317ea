//! Boot-time facts from the host (entropy, clock, hostname), the sandbox's identity, and
//! power-off.

use std::{io::Write, os::fd::AsRawFd, os::unix::fs::OpenOptionsExt, path::Path};

use hutch_protocol::{ErrorCode, GuestIdentity, GuestMsg, OpError, Setup};
use nix::{sys::time::TimeSpec, time::ClockId};

use crate::{ops::io_error, server::Conn};

/// Most entropy bytes accepted in one `Setup`.
const MAX_ENTROPY: usize = 4096;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::Ioctl = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::Ioctl = 0x5207;

/// Applies `setup` when the agent is the VM's init; as a host process it only validates, so a
/// test never touches the host's clock, RNG or hostname.
pub fn apply(setup: &Setup, is_init: bool) -> Result<(), OpError> {
    validate(setup)?;
    if !is_init {
        return Ok(());
    }
    seed_rng(&setup.entropy).map_err(io_error)?;
    let now = TimeSpec::new(setup.unix_secs as i64, setup.unix_nanos as i64);
    nix::time::clock_settime(ClockId::CLOCK_REALTIME, now).map_err(|e| io_error(e.into()))?;
    nix::unistd::sethostname(&setup.hostname).map_err(|e| io_error(e.into()))?;
    tracing::info!(hostname = %setup.hostname, "setup applied");
    Ok(())
}

/// Where the identity files really live: on tmpfs, so that a freshly restored clone writes
/// them without touching a disk (its first write to the overlay's disk costs tens of
/// milliseconds under emulation). `/etc` names them through symlinks, made once per root
/// filesystem (a template's clones inherit them).
const IDENTITY_DIR: &str = "/run/hutch";

/// Writes the sandbox's machine-id and id (as the VM's init; as a host process it only
/// validates). Synchronous on purpose: two tiny files on tmpfs, and a freshly restored guest
/// under emulation pays dearly for every thread hop.
pub fn apply_identity(identity: &GuestIdentity, is_init: bool) -> Result<(), OpError> {
    if identity.machine_id == [0; 16] {
        return Err(bad("the machine-id is all zeros".into()));
    }
    check_hostname(&identity.sandbox_id)?;
    if !is_init {
        return Ok(());
    }
    let machine_id: String = identity
        .machine_id
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let dir = Path::new(IDENTITY_DIR);
    std::fs::create_dir_all(dir).map_err(io_error)?;
    let files = [
        ("/etc/machine-id", "machine-id", machine_id.as_str()),
        ("/etc/hutch/sandbox-id", "sandbox-id", &identity.sandbox_id),
    ];
    for (name, file, line) in files {
        let real = dir.join(file);
        replace_file(&real, line).map_err(io_error)?;
        link_once(Path::new(name), &real).map_err(io_error)?;
    }
    tracing::info!(sandbox = %identity.sandbox_id, "identity applied");
    Ok(())
}

/// Replaces `path` with `line` and a newline, read-only for all, atomically (temp + rename).
fn replace_file(path: &Path, line: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("hutch-tmp");
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o444)
        .open(&tmp)
        .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Makes `link` a symlink to `target` (atomically replacing whatever is there), unless it
/// already is one.
fn link_once(link: &Path, target: &Path) -> std::io::Result<()> {
    if std::fs::read_link(link).is_ok_and(|t| t == target) {
        return Ok(());
    }
    if let Some(parent) = link.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = link.with_extension("hutch-tmp");
    let _ = std::fs::remove_file(&tmp);
    let linked =
        std::os::unix::fs::symlink(target, &tmp).and_then(|()| std::fs::rename(&tmp, link));
    if linked.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    linked
}

fn bad(message: String) -> OpError {
    OpError {
        code: ErrorCode::InvalidRequest,
        message,
    }
}

fn validate(setup: &Setup) -> Result<(), OpError> {
    if setup.entropy.len() > MAX_ENTROPY {
        return Err(bad(format!("more than {MAX_ENTROPY} entropy bytes")));
    }
    if setup.unix_nanos >= 1_000_000_000 {
        return Err(bad("nanoseconds out of range".into()));
    }
    check_hostname(&setup.hostname)
}

/// A hostname label: 1–63 ASCII letters, digits and dashes, not starting with a dash.
fn check_hostname(h: &str) -> Result<(), OpError> {
    let ok = !h.is_empty()
        && h.len() <= 63
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !h.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(bad(format!("invalid hostname {h:?}")))
    }
}

/// Credits `bytes` to the kernel's entropy pool, then forces a CRNG reseed.
fn seed_rng(bytes: &[u8]) -> std::io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/random")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(bytes);
    info.resize(8 + bytes.len().div_ceil(4) * 4, 0);
    // SAFETY: the buffer is a valid rand_pool_info that outlives both calls.
    unsafe {
        if libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Answers `Shutdown`: syncs, confirms to the host, then powers off (PID 1) or exits (test mode).
pub async fn shutdown(conn: &Conn, op: u32) {
    nix::unistd::sync();
    conn.send(op, GuestMsg::Done);
    conn.flush().await;
    if conn.is_init {
        crate::init::power_off();
    }
    std::process::exit(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(machine_id: [u8; 16], sandbox_id: &str) -> GuestIdentity {
        GuestIdentity {
            machine_id,
            sandbox_id: sandbox_id.into(),
        }
    }

    #[test]
    fn identity_is_validated_before_anything_is_written() {
        assert!(apply_identity(&identity([7; 16], "sb-0123456789"), false).is_ok());
        let refused = [
            identity([0; 16], "sb-1"),
            identity([7; 16], "../etc/passwd"),
            identity([7; 16], "a\nb"),
            identity([7; 16], ""),
            identity([7; 16], &"x".repeat(64)),
        ];
        for id in refused {
            let e = apply_identity(&id, false).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{id:?}");
        }
    }

    #[test]
    fn replace_file_swaps_the_whole_file_read_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("machine-id");
        std::fs::write(&path, "old contents that are longer\n").unwrap();
        replace_file(&path, "abc").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "abc\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o444);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left");
    }

    #[test]
    fn link_once_replaces_a_file_with_a_symlink_and_then_leaves_it() {
        let dir = tempfile::tempdir().unwrap();
        let (real, link) = (dir.path().join("real"), dir.path().join("etc/id"));
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(&link, "the image's\n").unwrap();
        replace_file(&real, "new").unwrap();
        link_once(&link, &real).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), real);
        assert_eq!(std::fs::read_to_string(&link).unwrap(), "new\n");
        let before = std::fs::symlink_metadata(&link)
            .unwrap()
            .modified()
            .unwrap();
        #[allow(clippy::disallowed_methods)] // A sync test: lets the mtime move on.
        std::thread::sleep(std::time::Duration::from_millis(20));
        replace_file(&real, "newer").unwrap();
        link_once(&link, &real).unwrap();
        let after = std::fs::symlink_metadata(&link)
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(before, after, "an existing link is left alone");
        assert_eq!(std::fs::read_to_string(&link).unwrap(), "newer\n");
        // A missing parent is made.
        let deep = dir.path().join("a/b/id");
        link_once(&deep, &real).unwrap();
        assert_eq!(std::fs::read_link(&deep).unwrap(), real);
    }
}
