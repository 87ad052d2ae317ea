//! What `hutch doctor` reports about the host's virtualization support.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::timer::{host_tsc, HostTsc};
use crate::VmmError;

/// The QEMU binary Hutch uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QemuInfo {
    /// Its path.
    pub path: PathBuf,
    /// The first line of `qemu-system-x86_64 --version`.
    pub version: String,
}

/// Whether `/dev/kvm` can be used at all. Openable does not mean guests boot: see
/// [`crate::probe_accel`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KvmStatus {
    /// `/dev/kvm` exists.
    pub present: bool,
    /// It can be opened read-write by this process.
    pub openable: bool,
    /// Why not, when it cannot.
    pub error: Option<String>,
}

/// Host facts for `hutch doctor`.
#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    /// The QEMU binary, or why there is none.
    pub qemu: Result<QemuInfo, String>,
    /// `/dev/kvm`.
    pub kvm: KvmStatus,
    /// The host kernel release (`uname -r`).
    pub host_kernel: String,
    /// The host TSC as a TCG guest will see it (see [`crate::timer`]).
    pub tsc: Option<HostTsc>,
    /// Whether shared folders work here (virtiofsd, and QEMU's `vhost-user-fs-device`): what
    /// was found, or what is missing.
    pub shares: Result<String, String>,
}

/// Collects the [`HostReport`]. Blocking: runs `qemu-system-x86_64 --version` and measures the
/// TSC (about 60 ms).
pub fn host_report() -> HostReport {
    let qemu = find_qemu()
        .map_err(|e| e.to_string())
        .and_then(|path| match qemu_version(&path) {
            Ok(version) => Ok(QemuInfo { path, version }),
            Err(e) => Err(format!("{e}")),
        });
    let shares = match &qemu {
        Ok(q) => share_support(&q.path),
        Err(_) => Err("no QEMU".into()),
    };
    HostReport {
        shares,
        qemu,
        kvm: kvm_status(),
        host_kernel: host_kernel_release(),
        tsc: host_tsc(),
    }
}

/// Finds `qemu-system-x86_64`: `$HUTCH_QEMU` if set, else the first executable on `$PATH`.
pub fn find_qemu() -> Result<PathBuf, VmmError> {
    if let Some(p) = std::env::var_os("HUTCH_QEMU").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(VmmError::QemuNotFound)
        };
    }
    find_in_path("qemu-system-x86_64").ok_or(VmmError::QemuNotFound)
}

pub(crate) fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The first line of `<qemu> --version`.
/// Whether `qemu` and this host can serve shared folders: virtiofsd is installed and QEMU has
/// the virtio-mmio `vhost-user-fs-device`.
#[allow(clippy::disallowed_methods)] // Blocking by design: callers use the blocking pool.
pub fn share_support(qemu: &Path) -> Result<String, String> {
    let virtiofsd = crate::find_virtiofsd().ok_or_else(|| VmmError::NoVirtiofsd.to_string())?;
    let out = std::process::Command::new(qemu)
        .args(["-device", "help"])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {} -device help: {e}", qemu.display()))?;
    let devices = String::from_utf8_lossy(&out.stdout);
    if !devices.contains("\"vhost-user-fs-device\"") {
        return Err(format!(
            "{} has no vhost-user-fs-device (virtio-fs for microvm)",
            qemu.display()
        ));
    }
    Ok(format!(
        "virtiofsd {} and QEMU's vhost-user-fs-device (QEMU backend only)",
        virtiofsd.display()
    ))
}

#[allow(clippy::disallowed_methods)] // Blocking by design: callers use the blocking pool.
pub(crate) fn qemu_version(qemu: &Path) -> Result<String, VmmError> {
    let out = std::process::Command::new(qemu)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| VmmError::io("run", qemu, e))?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.lines().next() {
        Some(l) if out.status.success() => Ok(l.trim().to_string()),
        _ => Err(VmmError::io(
            "run --version of",
            qemu,
            std::io::Error::other(format!("exited with {}", out.status)),
        )),
    }
}

/// `/dev/kvm`'s presence and whether it opens read-write.
pub(crate) fn kvm_status() -> KvmStatus {
    let path = Path::new("/dev/kvm");
    if !path.exists() {
        return KvmStatus {
            present: false,
            openable: false,
            error: Some("/dev/kvm does not exist".into()),
        };
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => KvmStatus {
            present: true,
            openable: true,
            error: None,
        },
        Err(e) => KvmStatus {
            present: true,
            openable: false,
            error: Some(format!("/dev/kvm cannot be opened read-write: {e}")),
        },
    }
}

/// `uname -r`.
pub(crate) fn host_kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
