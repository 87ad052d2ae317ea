//! Choosing the accelerator by booting a real guest, not by looking at `/dev/kvm`.
//!
//! `/dev/kvm` can exist, open and create VMs while stock guest kernels still cannot run under it
//! (nested PVM on this project's hosts: QEMU aborts with "failed to set MSR 0x10a", and with that
//! MSR masked the guest hangs after "Probing EDD"). So [`probe_accel`] boots the real kernel and
//! initramfs under `-accel kvm -cpu host` with `hutch.probe=1`; the agent prints
//! [`PROBE_MARKER`] on the console and powers off. KVM is chosen only if that line appears
//! within [`PROBE_TIMEOUT`]. The result is cached, keyed by [`ProbeKey`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::host::{find_qemu, host_kernel_release, kvm_status, qemu_version};
use crate::qemu::accel_args;
use crate::spawn::{spawn_guarded, StderrTail};
use crate::Accel;

/// The console line the guest agent prints when booted with `hutch.probe=1`.
pub const PROBE_MARKER: &str = "hutch-probe-ok";

/// How long a KVM probe guest gets to print [`PROBE_MARKER`].
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Console bytes the probe reads at most before giving up on finding the marker.
const PROBE_CONSOLE_MAX: usize = 4 << 20;

/// The accelerator decision and why it was made (for logs and `hutch doctor`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelReport {
    /// The accelerator to use.
    pub accel: Accel,
    /// Why, in one line.
    pub reason: String,
    /// Whether this came from the cache file rather than a boot just now.
    #[serde(default)]
    pub cached: bool,
}

/// What `HUTCH_ACCEL` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelOverride {
    /// Probe (the default).
    Auto,
    /// Use KVM without probing.
    Kvm,
    /// Use TCG without probing.
    Tcg,
}

impl AccelOverride {
    /// Parses `kvm`, `tcg` or `auto` (case-insensitive; empty means `auto`).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            _ => Err(format!(
                "HUTCH_ACCEL={:?} is not kvm, tcg or auto",
                s.chars().take(40).collect::<String>()
            )),
        }
    }

    /// Reads `HUTCH_ACCEL`; unset means `auto`.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("HUTCH_ACCEL") {
            Ok(v) => Self::parse(&v),
            Err(std::env::VarError::NotPresent) => Ok(Self::Auto),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err("HUTCH_ACCEL is not kvm, tcg or auto".into())
            }
        }
    }
}

/// What a cached probe result depends on. A change to any of these re-runs the probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeKey {
    /// Host kernel release (`uname -r`): KVM behaviour changes with it.
    pub host_kernel: String,
    /// `qemu-system-x86_64 --version`, first line.
    pub qemu_version: String,
    /// Guest kernel file size in bytes.
    pub kernel_size: u64,
    /// Guest kernel file mtime, nanoseconds since the epoch.
    pub kernel_mtime_ns: i64,
    /// Initramfs file size (the agent that answers the probe lives there).
    pub initrd_size: u64,
    /// Initramfs mtime, nanoseconds since the epoch.
    pub initrd_mtime_ns: i64,
}

impl ProbeKey {
    /// The key for these files on a host with this kernel release and QEMU version.
    pub fn for_files(
        host_kernel: &str,
        qemu_version: &str,
        kernel: &Path,
        initrd: &Path,
    ) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let k = std::fs::metadata(kernel)?;
        let i = std::fs::metadata(initrd)?;
        let ns = |m: &std::fs::Metadata| m.mtime().saturating_mul(1_000_000_000) + m.mtime_nsec();
        Ok(ProbeKey {
            host_kernel: host_kernel.to_string(),
            qemu_version: qemu_version.to_string(),
            kernel_size: k.len(),
            kernel_mtime_ns: ns(&k),
            initrd_size: i.len(),
            initrd_mtime_ns: ns(&i),
        })
    }
}

/// The cache file's content.
#[derive(Debug, Serialize, Deserialize)]
struct CacheEntry {
    key: ProbeKey,
    report: AccelReport,
    probed_at_unix: u64,
}

/// Decides the accelerator: honours `HUTCH_ACCEL=kvm|tcg|auto`, and for `auto` (the default)
/// runs [`probe_accel_with`]. An unparsable `HUTCH_ACCEL` is reported in the reason and treated
/// as `auto`.
pub async fn probe_accel(kernel: &Path, initrd: &Path, cache_file: &Path) -> AccelReport {
    match AccelOverride::from_env() {
        Ok(o) => probe_accel_with(o, kernel, initrd, cache_file).await,
        Err(msg) => {
            let mut r = probe_accel_with(AccelOverride::Auto, kernel, initrd, cache_file).await;
            r.reason = format!("{msg}; {}", r.reason);
            r
        }
    }
}

/// Decides the accelerator, given the override:
///
/// * `/dev/kvm` missing or not openable read-write → TCG, no boot;
/// * a cached result with the same [`ProbeKey`] → that result;
/// * else boot the guest under KVM (bounded by [`PROBE_TIMEOUT`]); KVM if it prints
///   [`PROBE_MARKER`], else TCG. The probe VM is always killed and reaped; it creates no files.
///   The result is written to `cache_file`.
pub async fn probe_accel_with(
    ov: AccelOverride,
    kernel: &Path,
    initrd: &Path,
    cache_file: &Path,
) -> AccelReport {
    let report = |accel, reason: String| AccelReport {
        accel,
        reason,
        cached: false,
    };
    match ov {
        AccelOverride::Kvm => return report(Accel::Kvm, "HUTCH_ACCEL=kvm".into()),
        AccelOverride::Tcg => return report(Accel::Tcg, "HUTCH_ACCEL=tcg".into()),
        AccelOverride::Auto => {}
    }
    let kvm = kvm_status();
    if !kvm.openable {
        let why = kvm.error.unwrap_or_else(|| "/dev/kvm is unusable".into());
        return report(Accel::Tcg, why);
    }
    let qemu = match find_qemu() {
        Ok(q) => q,
        Err(e) => return report(Accel::Tcg, format!("cannot probe KVM: {e}")),
    };
    let (qemu2, k2, i2) = (qemu.clone(), kernel.to_path_buf(), initrd.to_path_buf());
    let key = tokio::task::spawn_blocking(move || -> Result<ProbeKey, String> {
        let version = qemu_version(&qemu2).map_err(|e| e.to_string())?;
        ProbeKey::for_files(&host_kernel_release(), &version, &k2, &i2)
            .map_err(|e| format!("kernel or initrd not readable: {e}"))
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    let key = match key {
        Ok(k) => k,
        Err(e) => return report(Accel::Tcg, format!("cannot probe KVM: {e}")),
    };
    if let Some(mut cached) = read_cache(cache_file, &key) {
        cached.cached = true;
        return cached;
    }
    let (accel, reason) = boot_probe(&qemu, kernel, initrd).await;
    let r = report(accel, reason);
    if let Err(e) = write_cache(cache_file, &key, &r) {
        tracing::warn!(file = %cache_file.display(), error = %e, "could not cache the KVM probe result");
    }
    r
}

fn read_cache(path: &Path, key: &ProbeKey) -> Option<AccelReport> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.len() > 64 * 1024 {
        return None;
    }
    let entry: CacheEntry = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    (entry.key == *key).then_some(entry.report)
}

fn write_cache(path: &Path, key: &ProbeKey, report: &AccelReport) -> std::io::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let entry = CacheEntry {
        key: key.clone(),
        report: AccelReport {
            cached: false,
            ..report.clone()
        },
        probed_at_unix: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, serde_json::to_vec_pretty(&entry)?)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The QEMU arguments of the probe VM: no disks, no sockets, console on stdout.
pub(crate) fn probe_args(kernel: &Path, initrd: &Path) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "-name".into(),
        format!("hutch-probe-{}", std::process::id()),
        "-M".into(),
        "microvm,acpi=on".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-no-reboot".into(),
    ];
    a.extend(accel_args(Accel::Kvm).iter().map(|s| s.to_string()));
    a.extend(
        [
            "-smp",
            "1",
            "-m",
            "256",
            "-append",
            "console=ttyS0 panic=-1 reboot=t hutch.probe=1",
            "-chardev",
            "stdio,id=con,signal=off",
            "-serial",
            "chardev:con",
        ]
        .map(String::from),
    );
    a.extend([
        "-kernel".into(),
        kernel.to_string_lossy().into_owned(),
        "-initrd".into(),
        initrd.to_string_lossy().into_owned(),
    ]);
    a
}

enum Watch {
    Seen,
    Eof,
    TooMuch,
}

/// Boots the probe VM under KVM and watches its console for [`PROBE_MARKER`].
async fn boot_probe(qemu: &Path, kernel: &Path, initrd: &Path) -> (Accel, String) {
    let started = Instant::now();
    let mut child = match spawn_guarded(qemu, &probe_args(kernel, initrd)) {
        Ok(c) => c,
        Err(e) => return (Accel::Tcg, format!("cannot probe KVM: {e}")),
    };
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let (stderr, stderr_task) = StderrTail::collect(child.stderr.take().expect("stderr is piped"));

    let watch = async {
        let mut seen: Vec<u8> = Vec::new();
        let mut chunk = [0u8; 4096];
        let mut total = 0usize;
        loop {
            match stdout.read(&mut chunk).await {
                Ok(0) | Err(_) => return Watch::Eof,
                Ok(n) => {
                    total += n;
                    // Keep only what a marker split across reads could need.
                    let keep = seen.len().saturating_sub(PROBE_MARKER.len());
                    seen.drain(..keep);
                    seen.extend_from_slice(&chunk[..n]);
                    if seen
                        .windows(PROBE_MARKER.len())
                        .any(|w| w == PROBE_MARKER.as_bytes())
                    {
                        return Watch::Seen;
                    }
                    if total > PROBE_CONSOLE_MAX {
                        return Watch::TooMuch;
                    }
                }
            }
        }
    };
    let outcome = tokio::time::timeout(PROBE_TIMEOUT, watch).await;
    let ms = started.elapsed().as_millis();
    let _ = child.start_kill();
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), stderr_task).await;
    match outcome {
        Ok(Watch::Seen) => (
            Accel::Kvm,
            format!("a KVM guest booted to {PROBE_MARKER} in {ms} ms"),
        ),
        Ok(Watch::TooMuch) => (
            Accel::Tcg,
            format!("the KVM probe guest wrote over {PROBE_CONSOLE_MAX} console bytes without {PROBE_MARKER}"),
        ),
        Ok(Watch::Eof) => {
            let status = match status {
                Ok(Ok(s)) => s.to_string(),
                _ => "still running".into(),
            };
            (
                Accel::Tcg,
                format!(
                    "QEMU could not run a KVM guest ({status} after {ms} ms): {}",
                    stderr.one_line()
                ),
            )
        }
        Err(_) => (
            Accel::Tcg,
            format!(
                "KVM guests did not boot within {}s (nested virtualization?)",
                PROBE_TIMEOUT.as_secs()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_override() {
        assert_eq!(AccelOverride::parse("KVM"), Ok(AccelOverride::Kvm));
        assert_eq!(AccelOverride::parse("tcg"), Ok(AccelOverride::Tcg));
        assert_eq!(AccelOverride::parse(""), Ok(AccelOverride::Auto));
        assert_eq!(AccelOverride::parse("auto"), Ok(AccelOverride::Auto));
        assert!(AccelOverride::parse("kmv").is_err());
    }

    #[tokio::test]
    async fn overrides_skip_the_probe() {
        let missing = Path::new("/nonexistent");
        let r = probe_accel_with(AccelOverride::Tcg, missing, missing, missing).await;
        assert_eq!(
            (r.accel, r.reason.as_str()),
            (Accel::Tcg, "HUTCH_ACCEL=tcg")
        );
        let r = probe_accel_with(AccelOverride::Kvm, missing, missing, missing).await;
        assert_eq!(r.accel, Accel::Kvm);
    }

    #[test]
    fn cache_key_follows_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let (k, i) = (dir.path().join("vmlinuz"), dir.path().join("initrd"));
        std::fs::write(&k, b"kernel").unwrap();
        std::fs::write(&i, b"initrd").unwrap();
        let key = |host: &str, q: &str| ProbeKey::for_files(host, q, &k, &i).unwrap();
        let a = key("6.1.0", "QEMU 7.2");
        assert_eq!(a, key("6.1.0", "QEMU 7.2"));
        assert_ne!(a, key("6.2.0", "QEMU 7.2"));
        assert_ne!(a, key("6.1.0", "QEMU 8.0"));
        std::fs::write(&k, b"kernel, rebuilt").unwrap();
        assert_ne!(a, key("6.1.0", "QEMU 7.2"), "kernel size change");
        let b = key("6.1.0", "QEMU 7.2");
        let f = std::fs::File::options().write(true).open(&i).unwrap();
        f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000))
            .unwrap();
        assert_ne!(b, key("6.1.0", "QEMU 7.2"), "initrd mtime change");
    }

    #[test]
    fn cache_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (k, i) = (dir.path().join("vmlinuz"), dir.path().join("initrd"));
        std::fs::write(&k, b"kernel").unwrap();
        std::fs::write(&i, b"initrd").unwrap();
        let key = ProbeKey::for_files("h", "q", &k, &i).unwrap();
        let cache = dir.path().join("sub/accel.json");
        assert_eq!(read_cache(&cache, &key), None);
        let r = AccelReport {
            accel: Accel::Tcg,
            reason: "because".into(),
            cached: false,
        };
        write_cache(&cache, &key, &r).unwrap();
        assert_eq!(read_cache(&cache, &key), Some(r));
        let other = ProbeKey {
            qemu_version: "q2".into(),
            ..key
        };
        assert_eq!(read_cache(&cache, &other), None);
        std::fs::write(&cache, b"garbage").unwrap();
        assert_eq!(read_cache(&cache, &other), None);
    }

    #[test]
    fn probe_command() {
        let a = probe_args(Path::new("/k"), Path::new("/i")).join(" ");
        assert!(a.contains("-accel kvm -cpu host"));
        assert!(a.contains("hutch.probe=1"));
        assert!(a.contains("-name hutch-probe-"));
        assert!(!a.contains("-drive"));
    }
}
