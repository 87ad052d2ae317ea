//! Launching Firecracker through its jailer: a chroot per VM, its own uid/gid, cgroup limits, an
//! optional network namespace and a new PID namespace.
//!
//! ```text
//! <chroot_base>/<exec name>/<id>/root/      the jail (created by the jailer)
//!   <exec name>                             the jailer's copy of firecracker
//!   <exec name>.pid                         firecracker's pid, written by the jailer
//!   api.sock  v.sock                        API and vsock sockets (made by firecracker)
//!   vmlinux  initrd  rootfs  scratch.ext4   linked or copied in by Hutch
//!   lib64/ld-linux-x86-64.so.2  lib/…/libc.so.6 …
//!                                           a dynamically linked firecracker's interpreter and
//!                                           libraries, copied in by Hutch before the jailer runs
//! ```
//!
//! The jailer's exit code says nothing about Firecracker (with `--new-pid-ns` it exits 0 once it
//! has cloned the child), so readiness is the pid file plus an API socket that answers.

use std::path::{Path, PathBuf};

use super::FirecrackerError;

/// Where the unified cgroup v2 hierarchy (or the v1 controller mounts) live.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Which cgroup hierarchy the host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// Per-controller hierarchies (`/sys/fs/cgroup/<controller>/`).
    V1,
    /// The unified hierarchy (`/sys/fs/cgroup/cgroup.controllers` exists).
    V2,
}

impl CgroupVersion {
    fn arg(self) -> &'static str {
        match self {
            CgroupVersion::V1 => "1",
            CgroupVersion::V2 => "2",
        }
    }
}

/// The host's cgroup version: v2 when `/sys/fs/cgroup` is the unified hierarchy (a hybrid host,
/// with v2 only under `unified/`, counts as v1, as the jailer sees it).
pub fn detect_cgroup_version() -> CgroupVersion {
    detect_cgroup_version_at(Path::new(CGROUP_ROOT))
}

pub(crate) fn detect_cgroup_version_at(root: &Path) -> CgroupVersion {
    if root.join("cgroup.controllers").exists() {
        CgroupVersion::V2
    } else {
        CgroupVersion::V1
    }
}

/// How to run Firecracker under the jailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerConfig {
    /// The `jailer` binary (same version as firecracker). A dynamically linked firecracker gets
    /// its libraries copied into each chroot; the static musl release needs none.
    pub jailer: PathBuf,
    /// `--chroot-base-dir` (the jailer's default is `/srv/jailer`). Must not be writable by others.
    pub chroot_base: PathBuf,
    /// The uid Firecracker runs as. Give every VM its own where possible.
    pub uid: u32,
    /// The gid Firecracker runs as.
    pub gid: u32,
    /// The cgroup version; `None` detects it ([`detect_cgroup_version`]).
    pub cgroup_version: Option<CgroupVersion>,
    /// `--parent-cgroup`; `None` leaves the jailer's default (the exec file's name).
    pub parent_cgroup: Option<String>,
    /// Memory allowed on top of guest memory for Firecracker itself (its threads, buffers), in
    /// MiB; `None` sets no memory limit.
    pub memory_overhead_mib: Option<u32>,
    /// More `--cgroup <file>=<value>` settings, e.g. `cpu.max=200000 100000` (v2).
    pub extra_cgroups: Vec<String>,
    /// `--resource-limit no-file=N`; `None` keeps the jailer's default (2048).
    pub no_file: Option<u64>,
}

impl JailerConfig {
    /// A jailer launch with `/srv/jailer` as base, the detected cgroup version, and a memory
    /// limit of guest memory + 128 MiB.
    pub fn new(jailer: impl Into<PathBuf>, uid: u32, gid: u32) -> Self {
        Self {
            jailer: jailer.into(),
            chroot_base: "/srv/jailer".into(),
            uid,
            gid,
            cgroup_version: None,
            parent_cgroup: None,
            memory_overhead_mib: Some(128),
            extra_cgroups: Vec::new(),
            no_file: None,
        }
    }

    /// The file name the jailer gives firecracker inside the jail (and names the jail dir with).
    pub(crate) fn exec_name(firecracker: &Path) -> String {
        firecracker
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "firecracker".into())
    }

    /// `<chroot_base>/<exec name>/<id>`: everything of this VM's jail; remove it on destroy.
    pub fn jail_dir(&self, firecracker: &Path, id: &str) -> PathBuf {
        self.chroot_base.join(Self::exec_name(firecracker)).join(id)
    }

    /// The jail's root: what Firecracker sees as `/`.
    pub fn jail_root(&self, firecracker: &Path, id: &str) -> PathBuf {
        self.jail_dir(firecracker, id).join("root")
    }

    /// The `--cgroup` settings for a VM with `memory_mib` of guest memory.
    fn cgroup_settings(&self, version: CgroupVersion, memory_mib: u32) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(over) = self.memory_overhead_mib {
            let bytes = (u64::from(memory_mib) + u64::from(over)) << 20;
            v.push(match version {
                CgroupVersion::V2 => format!("memory.max={bytes}"),
                CgroupVersion::V1 => format!("memory.limit_in_bytes={bytes}"),
            });
        }
        v.extend(self.extra_cgroups.iter().cloned());
        v
    }

    /// The jailer's arguments for VM `id`, with firecracker's own after `--`.
    pub fn args(
        &self,
        firecracker: &Path,
        id: &str,
        memory_mib: u32,
        netns: Option<&Path>,
        version: CgroupVersion,
        firecracker_args: &[String],
    ) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--id".into(),
            id.into(),
            "--exec-file".into(),
            firecracker.to_string_lossy().into_owned(),
            "--uid".into(),
            self.uid.to_string(),
            "--gid".into(),
            self.gid.to_string(),
            "--chroot-base-dir".into(),
            self.chroot_base.to_string_lossy().into_owned(),
            "--cgroup-version".into(),
            version.arg().into(),
        ];
        for c in self.cgroup_settings(version, memory_mib) {
            a.push("--cgroup".into());
            a.push(c);
        }
        if let Some(p) = &self.parent_cgroup {
            a.push("--parent-cgroup".into());
            a.push(p.clone());
        }
        if let Some(ns) = netns {
            a.push("--netns".into());
            a.push(ns.to_string_lossy().into_owned());
        }
        if let Some(n) = self.no_file {
            a.push("--resource-limit".into());
            a.push(format!("no-file={n}"));
        }
        a.push("--new-pid-ns".into());
        a.push("--".into());
        a.extend(firecracker_args.iter().cloned());
        a
    }

    /// The cgroup directories the jailer creates for VM `id` (to remove once it is dead).
    pub fn cgroup_dirs(
        &self,
        firecracker: &Path,
        id: &str,
        memory_mib: u32,
        version: CgroupVersion,
    ) -> Vec<PathBuf> {
        let parent = self
            .parent_cgroup
            .clone()
            .unwrap_or_else(|| Self::exec_name(firecracker));
        let root = Path::new(CGROUP_ROOT);
        match version {
            CgroupVersion::V2 => vec![root.join(&parent).join(id)],
            CgroupVersion::V1 => {
                let mut controllers: Vec<String> = self
                    .cgroup_settings(version, memory_mib)
                    .iter()
                    .filter_map(|c| c.split('.').next().map(str::to_string))
                    .collect();
                controllers.sort();
                controllers.dedup();
                controllers
                    .into_iter()
                    .map(|c| root.join(c).join(&parent).join(id))
                    .collect()
            }
        }
    }
}

/// Puts `src` into the jail at `dst` for `uid:gid`: a hard link when the file is world-readable
/// (read-only inputs; no copy of a multi-GiB rootfs), otherwise a copy owned by the jail's user.
pub(crate) fn link_into_jail(
    src: &Path,
    dst: &Path,
    uid: u32,
    gid: u32,
    writable: bool,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(src)?.permissions().mode();
    if !writable && mode & 0o004 != 0 && std::fs::hard_link(src, dst).is_ok() {
        return Ok(());
    }
    std::fs::copy(src, dst)?;
    std::os::unix::fs::chown(dst, Some(uid), Some(gid))?;
    let mode = if writable { 0o600 } else { 0o400 };
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode))
}

/// How long `ldd` may take.
const LDD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The shared objects a dynamically linked `firecracker` loads (its ELF interpreter and every
/// `DT_NEEDED` library, transitively, as resolved by `ldd`), by absolute path on the host; none
/// for a static binary (the official musl releases). A dynamically linked firecracker cannot
/// start in the jail without them.
pub(crate) async fn shared_libraries(firecracker: &Path) -> Result<Vec<PathBuf>, FirecrackerError> {
    let fail = |detail: String| FirecrackerError::Libraries {
        binary: firecracker.to_path_buf(),
        detail,
    };
    let ldd = crate::host::find_in_path("ldd").ok_or_else(|| fail("ldd not found".into()))?;
    let out = tokio::process::Command::new(ldd)
        .arg(firecracker)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(LDD_TIMEOUT, out)
        .await
        .map_err(|_| fail(format!("ldd took over {}s", LDD_TIMEOUT.as_secs())))?
        .map_err(|e| fail(format!("ldd: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    // glibc's ldd answers a static binary on stdout or stderr, with exit status 1.
    if is_static(&text) || is_static(&err) {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        return Err(fail(format!(
            "ldd {}: {}",
            out.status,
            crate::spawn::condense(&err)
        )));
    }
    parse_ldd(&text).map_err(fail)
}

fn is_static(ldd_output: &str) -> bool {
    ldd_output.contains("not a dynamic executable") || ldd_output.contains("statically linked")
}

/// The absolute paths in `ldd`'s output: `name => /path (0x…)` and the interpreter's
/// `/path (0x…)`; the vDSO (no path) is skipped, and a library `not found` is an error.
pub(crate) fn parse_ldd(output: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let target = match line.split_once("=>") {
            Some((name, target)) => {
                let target = target.trim();
                if target.starts_with("not found") {
                    return Err(format!("{} not found", name.trim()));
                }
                target
            }
            None => line,
        };
        // Strip the load address: `/path (0x…)`.
        let path = match target.rsplit_once(" (") {
            Some((p, _)) => p.trim(),
            None => target,
        };
        if path.starts_with('/') {
            let path = PathBuf::from(path);
            if !libs.contains(&path) {
                libs.push(path);
            }
        } else if !path.is_empty() && line.contains("=>") {
            return Err(format!("unexpected ldd line {line:.120}"));
        }
    }
    Ok(libs)
}

/// Copies each of `libs` (absolute host paths) into the jail `root` at the same path, as
/// regular read-only files owned by root (a symlinked library arrives as its target's
/// content). Copies, not hard links, so nothing done inside the jail can reach the host's
/// files.
pub(crate) fn copy_libraries(libs: &[PathBuf], root: &Path) -> Result<(), FirecrackerError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    for lib in libs {
        let rel = lib.strip_prefix("/").unwrap_or(lib);
        let dest = root.join(rel);
        let copy = || -> std::io::Result<()> {
            if let Some(parent) = dest.parent() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(parent)?;
            }
            std::fs::copy(lib, &dest)?;
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o555))
        };
        copy().map_err(|source| FirecrackerError::CopyLibrary {
            library: lib.clone(),
            dest: dest.clone(),
            source,
        })?;
    }
    if !libs.is_empty() {
        tracing::debug!(root = %root.display(), count = libs.len(), "shared libraries copied into the jail");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_is_parsed() {
        let glibc = "\tlinux-vdso.so.1 (0x00007ffc2b1f7000)\n\
                     \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f080e04c000)\n\
                     \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f080da1e000)\n\
                     \t/lib64/ld-linux-x86-64.so.2 (0x00007f080e07f000)\n";
        assert_eq!(
            parse_ldd(glibc).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        let musl = "\t/lib/ld-musl-x86_64.so.1 (0x7f0d1c5a2000)\n\
                    \tlibc.musl-x86_64.so.1 => /lib/ld-musl-x86_64.so.1 (0x7f0d1c5a2000)\n";
        assert_eq!(
            parse_ldd(musl).unwrap(),
            vec![PathBuf::from("/lib/ld-musl-x86_64.so.1")]
        );
        let e = parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err();
        assert!(e.contains("libfoo.so.1 not found"), "{e}");
        assert!(is_static("\tnot a dynamic executable\n"));
        assert!(is_static("\tstatically linked\n"));
        assert!(!is_static(glibc));
    }

    #[test]
    fn libraries_are_copied_at_their_paths() {
        use std::os::unix::fs::PermissionsExt;
        let host = tempfile::tempdir().unwrap();
        let lib = host.path().join("lib/x86_64/libz.so.1.3");
        std::fs::create_dir_all(lib.parent().unwrap()).unwrap();
        std::fs::write(&lib, b"\x7fELF lib").unwrap();
        let link = host.path().join("lib/x86_64/libz.so.1");
        std::os::unix::fs::symlink("libz.so.1.3", &link).unwrap();
        let jail = tempfile::tempdir().unwrap();
        copy_libraries(std::slice::from_ref(&link), jail.path()).unwrap();
        let copied = jail.path().join(link.strip_prefix("/").unwrap());
        let meta = std::fs::symlink_metadata(&copied).unwrap();
        assert!(meta.is_file(), "a regular file, not a link");
        assert_eq!(meta.permissions().mode() & 0o777, 0o555);
        assert_eq!(std::fs::read(&copied).unwrap(), b"\x7fELF lib");
        let missing = host.path().join("nope.so");
        let e = copy_libraries(&[missing], jail.path()).unwrap_err();
        assert!(e.to_string().contains("nope.so"), "{e}");
        assert!(copy_libraries(&[], jail.path()).is_ok());
    }

    /// This host's `ldd` on a binary that is surely dynamic (`/bin/sh`) finds its libc and
    /// interpreter.
    #[tokio::test]
    async fn ldd_finds_libc_of_a_dynamic_binary() {
        let Some(sh) = crate::host::find_in_path("sh") else {
            return;
        };
        match shared_libraries(&sh).await {
            Ok(libs) if libs.is_empty() => {} // a static shell (e.g. busybox): nothing needed
            Ok(libs) => assert!(
                libs.iter().all(|l| l.is_absolute() && l.exists()),
                "{libs:?}"
            ),
            Err(e) => assert!(e.to_string().contains("ldd not found"), "{e}"),
        }
    }

    #[test]
    fn jailer_args() {
        let mut j = JailerConfig::new("/usr/bin/jailer", 10_001, 10_001);
        j.no_file = Some(4096);
        let a = j
            .args(
                Path::new("/opt/fc/firecracker"),
                "sbx-1",
                256,
                Some(Path::new("/var/run/netns/hutch-sbx-1")),
                CgroupVersion::V2,
                &["--api-sock".into(), "/api.sock".into()],
            )
            .join(" ");
        assert_eq!(
            a,
            "--id sbx-1 --exec-file /opt/fc/firecracker --uid 10001 --gid 10001 \
             --chroot-base-dir /srv/jailer --cgroup-version 2 --cgroup memory.max=402653184 \
             --netns /var/run/netns/hutch-sbx-1 --resource-limit no-file=4096 --new-pid-ns \
             -- --api-sock /api.sock"
        );
        assert_eq!(
            j.jail_root(Path::new("/opt/fc/firecracker"), "sbx-1"),
            Path::new("/srv/jailer/firecracker/sbx-1/root")
        );
    }

    #[test]
    fn cgroup_v1_and_dirs() {
        let mut j = JailerConfig::new("/j", 1, 1);
        j.extra_cgroups.push("cpuset.cpus=0".into());
        j.parent_cgroup = Some("hutch".into());
        let a = j
            .args(Path::new("/fc"), "x", 128, None, CgroupVersion::V1, &[])
            .join(" ");
        assert!(a.contains("--cgroup-version 1 --cgroup memory.limit_in_bytes=268435456 --cgroup cpuset.cpus=0 --parent-cgroup hutch"), "{a}");
        assert!(!a.contains("--netns"));
        assert_eq!(
            j.cgroup_dirs(Path::new("/fc"), "x", 128, CgroupVersion::V1),
            vec![
                PathBuf::from("/sys/fs/cgroup/cpuset/hutch/x"),
                PathBuf::from("/sys/fs/cgroup/memory/hutch/x")
            ]
        );
        assert_eq!(
            j.cgroup_dirs(Path::new("/fc"), "x", 128, CgroupVersion::V2),
            vec![PathBuf::from("/sys/fs/cgroup/hutch/x")]
        );
    }

    #[test]
    fn detects_cgroup_version() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(detect_cgroup_version_at(d.path()), CgroupVersion::V1);
        std::fs::write(d.path().join("cgroup.controllers"), "memory").unwrap();
        assert_eq!(detect_cgroup_version_at(d.path()), CgroupVersion::V2);
        // Whatever this host is, detection does not panic.
        let _ = detect_cgroup_version();
    }
}
