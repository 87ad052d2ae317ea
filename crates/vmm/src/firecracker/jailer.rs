//! Launching Firecracker through its jailer: a chroot per VM, its own uid/gid, cgroup limits, an
//! optional network namespace and a new PID namespace.
//!
//! ```text
//! <chroot_base>/<exec name>/<id>/root/      the jail (created by the jailer)
//!   <exec name>                             the jailer's copy of firecracker
//!   <exec name>.pid                         firecracker's pid, written by the jailer
//!   api.sock  v.sock                        API and vsock sockets (made by firecracker)
//!   vmlinux  initrd  rootfs  scratch.ext4   linked or copied in by Hutch
//! ```
//!
//! The jailer's exit code says nothing about Firecracker (with `--new-pid-ns` it exits 0 once it
//! has cloned the child), so readiness is the pid file plus an API socket that answers.

use std::path::{Path, PathBuf};

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
    /// The `jailer` binary (same version as firecracker; firecracker should be the static musl
    /// build, or its libraries must be put in the chroot).
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

#[cfg(test)]
mod tests {
    use super::*;

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
