//! Snapshots as VM operations: [`FirecrackerVm::snapshot_create`] (full or diff) and
//! [`FirecrackerVmm::restore_snapshot`] (a fresh process loading the state file, guest memory
//! mapped from the memory file with the `File` backend).
//!
//! What a load does not bring back, it is given again: the logger and metrics (configured
//! before the load, the only calls Firecracker takes first), the vsock socket (a `vsock_override`
//! to the new VM's own path, with any stale socket there removed first: Firecracker aborts on
//! one), and the TAPs (`network_overrides`). Block devices are not part of a snapshot: the
//! snapshot's drive paths must resolve for the new process — the shared rootfs by its path, and
//! the writable disk as a copy of [`RestoreOptions::scratch_disk`]: in the jail's
//! `/scratch.ext4`, or (direct) in the run dir, inherited as [`super::SCRATCH_FD`].
//!
//! As the [`Vm::snapshot`] / [`crate::Vmm::restore`] of the trait, a snapshot directory holds
//! `vmstate` (Firecracker's state file), `memory` (all of guest RAM, mapped copy-on-write by each
//! restore: [`SnapshotMemory::File`]), `disk` (a sparse copy of the writable disk, raw), the
//! record `snapshot.json` and `firecracker.json` (whether it was taken in a jail: the paths in
//! the state are jail paths then, so only a jailed backend restores it, and the other way round).

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{
    api, jailer, named_tap, open_netns, open_scratch, FirecrackerError, FirecrackerVm,
    FirecrackerVmm, Inherit, LaunchOptions, RunPaths, Shape, NIC_IFACE_ID,
};
use crate::common::RunDirGuard;
use crate::snapshot::{check_restore, copy_sparse, create_dir, freeze, write_record};
use crate::{validate_id, BootFiles, Nic, Snapshot, SnapshotMemory, Vm, VmSpec, VmmError};

/// The backend name in a [`Snapshot`] record.
const BACKEND: &str = "firecracker";
/// The file beside the record saying how the snapshot was taken.
const LAUNCH_RECORD: &str = "firecracker.json";

/// How a trait snapshot was taken (`firecracker.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct LaunchRecord {
    /// Taken in a jail: the state names jail paths (`/rootfs`, `/scratch.ext4`).
    jailed: bool,
}

/// The two files of a Firecracker snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFiles {
    /// The microVM state (devices, vCPUs).
    pub state: PathBuf,
    /// Guest memory: all of it for a full snapshot; for a diff, a sparse file holding only the
    /// pages written since the last snapshot. Keep it unchanged while VMs restored from it run
    /// (they map it copy-on-write).
    pub memory: PathBuf,
}

impl SnapshotFiles {
    /// `dir/vmstate` and `dir/memory`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            state: dir.join("vmstate"),
            memory: dir.join("memory"),
        }
    }
}

/// How [`FirecrackerVmm::restore_snapshot`] sets up the new VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    /// The network namespace to run in, as [`LaunchOptions::netns`] (jailed or direct).
    pub netns: Option<PathBuf>,
    /// New TAPs for the snapshot's interfaces (each must exist where the VM runs).
    pub network_overrides: Vec<api::NetworkOverride>,
    /// The writable disk as it was when the snapshot was taken: the VM gets its own copy, at
    /// the path the snapshot names for it (jailed: `/scratch.ext4` in the jail; direct: the
    /// run dir's `scratch.ext4`, inherited as [`super::SCRATCH_FD`]).
    pub scratch_disk: Option<PathBuf>,
    /// The MAC of the snapshot's guest NIC, if it has one: recorded, so that a snapshot of the
    /// restored VM says so.
    pub nic_mac: Option<[u8; 6]>,
    /// Re-arm KVM dirty-page tracking, for later diff snapshots of the restored VM.
    pub track_dirty_pages: bool,
    /// Resume at once; otherwise the VM comes back paused.
    pub resume: bool,
    /// Firecracker's log (not restored by a load; paths inside the jail when jailed).
    pub logger: Option<api::Logger>,
    /// Firecracker's metrics (not restored by a load; same path rule).
    pub metrics: Option<api::Metrics>,
}

impl FirecrackerVm {
    /// Writes a `kind` (full or diff) snapshot of the **paused** VM to `files` (which must not
    /// exist yet; their directory must) and leaves it paused. A diff holds the pages written
    /// since the last snapshot (or since boot) and is resumable only once merged onto its base
    /// (`snapshot-editor edit-memory rebase`), except a diff of a booted VM with dirty-page
    /// tracking. Jailed, Firecracker writes inside the jail and the files are moved out.
    pub async fn snapshot_create(
        &self,
        kind: api::SnapshotType,
        files: &SnapshotFiles,
    ) -> Result<(), VmmError> {
        if self.has_exited() {
            return Err(VmmError::NotRunning(self.core.id.clone()));
        }
        if !self.is_paused().await? {
            return Err(FirecrackerError::Snapshot("pause the VM first".into()).into());
        }
        for f in [&files.state, &files.memory] {
            if f.exists() {
                return Err(
                    FirecrackerError::Snapshot(format!("{} exists already", f.display())).into(),
                );
            }
        }
        let (state, memory) = match &self.identity.jail {
            Some(j) => (j.root.join("snapshot.state"), j.root.join("snapshot.mem")),
            None => (files.state.clone(), files.memory.clone()),
        };
        let started = Instant::now();
        let made = self
            .client
            .create_snapshot(&api::SnapshotCreateParams {
                mem_file_path: self.vm_path(&memory, "snapshot.mem"),
                snapshot_path: self.vm_path(&state, "snapshot.state"),
                snapshot_type: Some(kind),
            })
            .await;
        let moved = match (&made, &self.identity.jail) {
            (Ok(()), Some(_)) => {
                move_file(&state, &files.state).and_then(|()| move_file(&memory, &files.memory))
            }
            _ => Ok(()),
        };
        if made.is_err() || moved.is_err() {
            for f in [&state, &memory, &files.state, &files.memory] {
                let _ = std::fs::remove_file(f);
            }
        }
        made?;
        moved?;
        tracing::info!(id = %self.core.id, ?kind, ms = started.elapsed().as_millis() as u64, "firecracker snapshot created");
        Ok(())
    }

    /// Configures the logger and metrics, where given.
    pub(super) async fn put_telemetry(
        &self,
        logger: Option<&api::Logger>,
        metrics: Option<&api::Metrics>,
    ) -> Result<(), VmmError> {
        if let Some(l) = logger {
            self.client.put_logger(l).await?;
        }
        if let Some(m) = metrics {
            self.client.put_metrics(m).await?;
        }
        Ok(())
    }
}

impl FirecrackerVmm {
    /// Starts a fresh Firecracker process for `spec` (its id, run dir and lifetime; jailed, its
    /// kernel, initrd and rootfs are linked into the jail as at boot, since the snapshot names
    /// them there) and loads the snapshot `files` into it: guest memory mapped copy-on-write from
    /// the memory file, the vsock socket at the new VM's own path, `opts`' TAPs. The VM comes
    /// back paused unless `opts.resume`; its guest's vsock connections were reset, its listeners
    /// survive. On error nothing is left behind.
    pub async fn restore_snapshot(
        &self,
        spec: &VmSpec,
        opts: &RestoreOptions,
        files: &SnapshotFiles,
    ) -> Result<FirecrackerVm, VmmError> {
        validate_id(&spec.id)?;
        for (what, f) in [
            ("snapshot state", &files.state),
            ("snapshot memory", &files.memory),
        ] {
            crate::common::check_readable(what, f)?;
        }
        if let Some(d) = &opts.scratch_disk {
            crate::common::check_readable("scratch disk", d)?;
        }
        let paths = RunPaths::new(&spec.run_dir)?;
        let mut guard = RunDirGuard::create(&paths.dir)?;
        let started = Instant::now();
        let shape = Shape {
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            nic_mac: opts.nic_mac,
            scratch: opts.scratch_disk.is_some(),
            boot: Some(BootFiles::of(spec)),
        };
        let mut vm = match &self.jailer {
            None => {
                let scratch = match &opts.scratch_disk {
                    Some(d) => {
                        copy_sparse(d, &paths.scratch).await?;
                        writable(&paths.scratch)?;
                        Some(open_scratch(&paths.scratch)?)
                    }
                    None => None,
                };
                let netns = opts.netns.as_deref().map(open_netns).transpose()?;
                let inherit = Inherit {
                    scratch: scratch.as_ref(),
                    netns: netns.as_ref(),
                };
                self.launch_direct(spec, &paths, shape, inherit).await?
            }
            Some(j) => {
                let launch = LaunchOptions {
                    netns: opts.netns.clone(),
                    ..LaunchOptions::default()
                };
                self.launch_jailed(j, spec, &paths, &launch, shape).await?
            }
        };
        if let Err(e) = vm.load(opts, files).await {
            vm.kill_now().await;
            return Err(e);
        }
        tracing::info!(id = %spec.id, pid = vm.core.pid, jailed = vm.identity.jail.is_some(), ms = started.elapsed().as_millis() as u64, "firecracker restored from snapshot");
        guard.keep();
        Ok(vm)
    }
}

impl FirecrackerVm {
    /// Telemetry, the jail's inputs, a clean vsock path, then `PUT /snapshot/load`.
    async fn load(&self, opts: &RestoreOptions, files: &SnapshotFiles) -> Result<(), VmmError> {
        self.put_telemetry(opts.logger.as_ref(), opts.metrics.as_ref())
            .await?;
        let (state, memory, vsock) = match &self.identity.jail {
            Some(j) => {
                let link = |src: &Path, name: &str, writable: bool| {
                    jailer::link_into_jail(src, &j.root.join(name), j.uid, j.gid, writable)
                        .map_err(|e| VmmError::io("put into jail", src, e))
                };
                link(&files.state, "snapshot.state", false)?;
                link(&files.memory, "snapshot.mem", false)?;
                if let Some(d) = &opts.scratch_disk {
                    link(d, "scratch.ext4", true)?;
                }
                (
                    PathBuf::from("/snapshot.state"),
                    PathBuf::from("/snapshot.mem"),
                    j.root.join("v.sock"),
                )
            }
            None => (
                files.state.clone(),
                files.memory.clone(),
                self.paths.vsock.clone(),
            ),
        };
        // Firecracker aborts the load if the vsock socket's path is taken.
        match std::fs::remove_file(&vsock) {
            Ok(()) => tracing::debug!(path = %vsock.display(), "removed a stale vsock socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(VmmError::io("remove stale vsock socket", &vsock, e)),
        }
        let mut load = api::SnapshotLoadParams::from_file(state, memory);
        load.track_dirty_pages = opts.track_dirty_pages.then_some(true);
        load.resume_vm = Some(opts.resume);
        load.network_overrides = opts.network_overrides.clone();
        load.vsock_override = Some(api::VsockOverride {
            uds_path: self.vm_path(&self.paths.vsock, "v.sock"),
        });
        self.client.load_snapshot(&load).await?;
        Ok(())
    }
}

/// Makes a VM's copy of a frozen (read-only) disk writable by its owner.
fn writable(path: &Path) -> Result<(), VmmError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| VmmError::io("make writable", path, e))
}

impl FirecrackerVm {
    /// [`Vm::snapshot`]: a full snapshot of the paused VM into `dir` (created), its writable disk
    /// copied beside it, everything frozen, the record written. On error `dir` is removed.
    pub(super) async fn save(&self, dir: &Path) -> Result<Snapshot, VmmError> {
        let shape = self
            .identity
            .shape
            .clone()
            .ok_or_else(|| VmmError::Snapshot {
                id: self.core.id.clone(),
                detail: "the VM was started by an older Hutch that did not record its shape".into(),
            })?;
        if !self.is_paused().await? {
            return Err(VmmError::Snapshot {
                id: self.core.id.clone(),
                detail: "the VM must be paused first".into(),
            });
        }
        create_dir(dir)?;
        let saved = self.save_into(dir, shape).await;
        if saved.is_err() {
            let _ = std::fs::remove_dir_all(dir);
        }
        saved
    }

    async fn save_into(&self, dir: &Path, shape: Shape) -> Result<Snapshot, VmmError> {
        let files = SnapshotFiles::in_dir(dir);
        self.snapshot_create(api::SnapshotType::Full, &files)
            .await?;
        freeze(&files.state)?;
        freeze(&files.memory)?;
        let scratch = shape.scratch;
        let snapshot = snapshot_record(dir, shape);
        if scratch {
            let disk = match &self.identity.jail {
                Some(j) => j.root.join("scratch.ext4"),
                None => self.paths.scratch.clone(),
            };
            copy_sparse(&disk, &snapshot.disk_file()).await?;
            freeze(&snapshot.disk_file())?;
        }
        let launch = dir.join(LAUNCH_RECORD);
        let json = serde_json::to_vec(&LaunchRecord {
            jailed: self.identity.jail.is_some(),
        })
        .expect("serializes");
        std::fs::write(&launch, json).map_err(|e| VmmError::io("write", &launch, e))?;
        write_record(&snapshot)?;
        tracing::info!(id = %self.core.id, dir = %dir.display(), "firecracker snapshot saved");
        Ok(snapshot)
    }
}

/// The record of a snapshot of a VM of `shape` in `dir`.
fn snapshot_record(dir: &Path, shape: Shape) -> Snapshot {
    Snapshot {
        backend: BACKEND.into(),
        dir: dir.to_path_buf(),
        memory: SnapshotMemory::File(SnapshotFiles::in_dir(dir).memory),
        cpus: shape.cpus,
        memory_mib: shape.memory_mib,
        nic_mac: shape.nic_mac,
        disk_format: shape.scratch.then(|| "raw".to_string()),
        boot: shape.boot,
    }
}

impl FirecrackerVmm {
    /// [`crate::Vmm::restore`]: checks the record against `spec`, `nic` and this backend's
    /// mode, then restores it paused, with a copy of its disk.
    pub(super) async fn restore_record(
        &self,
        spec: &VmSpec,
        nic: Option<&Nic>,
        snap: &Snapshot,
    ) -> Result<FirecrackerVm, VmmError> {
        let (files, opts) = restore_plan(self.jailer.is_some(), spec, nic, snap)?;
        self.restore_snapshot(spec, &opts, &files).await
    }
}

/// What restoring `snap` as `spec` takes, or why it cannot be (before touching the host).
fn restore_plan(
    jailed: bool,
    spec: &VmSpec,
    nic: Option<&Nic>,
    snap: &Snapshot,
) -> Result<(SnapshotFiles, RestoreOptions), VmmError> {
    let bad = |why: String| {
        VmmError::InvalidSpec(format!(
            "cannot restore snapshot {}: {why}",
            snap.dir.display()
        ))
    };
    check_restore(BACKEND, spec, nic, snap)?;
    let (netns, network_overrides) = match nic {
        Some(nic) => {
            let (name, netns) = named_tap(nic)?;
            let over = api::NetworkOverride {
                iface_id: NIC_IFACE_ID.into(),
                host_dev_name: name.into(),
            };
            (Some(netns.to_path_buf()), vec![over])
        }
        None => (None, Vec::new()),
    };
    let SnapshotMemory::File(memory) = &snap.memory else {
        return Err(bad("it has no memory file".into()));
    };
    let launch_path = snap.dir.join(LAUNCH_RECORD);
    let launch: LaunchRecord = std::fs::read(&launch_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| bad(format!("{LAUNCH_RECORD} is missing or unreadable")))?;
    if launch.jailed != jailed {
        return Err(bad(format!(
            "it was taken {} the jailer, and its state names paths as seen from there; \
             restore it {} the jailer",
            if launch.jailed { "under" } else { "without" },
            if launch.jailed { "under" } else { "without" },
        )));
    }
    let files = SnapshotFiles {
        state: snap.state_file(),
        memory: memory.clone(),
    };
    let opts = RestoreOptions {
        netns,
        network_overrides,
        scratch_disk: snap.disk_format.is_some().then(|| snap.disk_file()),
        nic_mac: snap.nic_mac,
        resume: false,
        ..RestoreOptions::default()
    };
    if let Some(f) = snap.disk_format.as_deref().filter(|f| *f != "raw") {
        return Err(bad(format!(
            "its disk is {f:.20}, firecracker takes raw disks only"
        )));
    }
    Ok((files, opts))
}

/// Moves `src` to `dst`: a rename, or a copy and remove across file systems.
fn move_file(src: &Path, dst: &Path) -> Result<(), VmmError> {
    if std::fs::rename(src, dst).is_ok() {
        return Ok(());
    }
    std::fs::copy(src, dst).map_err(|e| VmmError::io("copy snapshot file to", dst, e))?;
    std::fs::remove_file(src).map_err(|e| VmmError::io("remove", src, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_in_a_dir() {
        let f = SnapshotFiles::in_dir(Path::new("/s"));
        assert_eq!(f.state, Path::new("/s/vmstate"));
        assert_eq!(f.memory, Path::new("/s/memory"));
    }

    fn shape(dir: &Path, scratch: bool) -> Shape {
        Shape {
            cpus: 2,
            memory_mib: 256,
            nic_mac: None,
            scratch,
            boot: Some(BootFiles::of(&spec_for(dir))),
        }
    }

    fn spec_for(dir: &Path) -> VmSpec {
        VmSpec {
            shares: Vec::new(),
            id: "fc-clone".into(),
            kernel: dir.join("k"),
            initrd: dir.join("i"),
            rootfs: dir.join("r"),
            cpus: 2,
            memory_mib: 256,
            scratch_disk_mib: 0,
            run_dir: dir.join("vm"),
            extra_cmdline: vec![],
            lifetime: crate::Lifetime::Owned,
            memory: Default::default(),
        }
    }

    /// A snapshot dir as `save` leaves it, with `jailed` in `firecracker.json`.
    fn saved(dir: &Path, scratch: bool, jailed: bool) -> Snapshot {
        let snap = snapshot_record(dir, shape(dir, scratch));
        std::fs::write(
            dir.join(LAUNCH_RECORD),
            serde_json::to_vec(&LaunchRecord { jailed }).unwrap(),
        )
        .unwrap();
        write_record(&snap).unwrap();
        snap
    }

    #[test]
    fn the_record_maps_to_the_restore() {
        let d = tempfile::tempdir().unwrap();
        let snap = saved(d.path(), true, false);
        assert_eq!(snap.backend, "firecracker");
        assert_eq!(snap.memory, SnapshotMemory::File(d.path().join("memory")));
        assert_eq!(snap.disk_format.as_deref(), Some("raw"));
        assert_eq!((snap.cpus, snap.memory_mib, snap.nic_mac), (2, 256, None));
        // What the record says round-trips through snapshot.json.
        assert_eq!(Snapshot::load(d.path()).unwrap(), snap);
        let (files, opts) = restore_plan(false, &spec_for(d.path()), None, &snap).unwrap();
        assert_eq!(files.state, d.path().join("vmstate"));
        assert_eq!(files.memory, d.path().join("memory"));
        assert_eq!(opts.scratch_disk, Some(d.path().join("disk")));
        assert!(!opts.resume, "a restore comes back paused");
        // No disk: none to copy.
        let e = tempfile::tempdir().unwrap();
        let snap = saved(e.path(), false, false);
        assert_eq!(snap.disk_format, None);
        let (_, opts) = restore_plan(false, &spec_for(e.path()), None, &snap).unwrap();
        assert_eq!(opts.scratch_disk, None);
        // A memory file elsewhere (e.g. put back on a tmpfs) is the one mapped.
        let moved = Snapshot {
            memory: SnapshotMemory::File("/dev/shm/x.mem".into()),
            ..snap
        };
        let (files, _) = restore_plan(false, &spec_for(e.path()), None, &moved).unwrap();
        assert_eq!(files.memory, Path::new("/dev/shm/x.mem"));
    }

    #[test]
    fn restores_that_cannot_work_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let snap = saved(d.path(), true, true);
        let spec = spec_for(d.path());
        let refused = |jailed: bool, spec: &VmSpec, snap: &Snapshot| {
            restore_plan(jailed, spec, None, snap)
                .unwrap_err()
                .to_string()
        };
        assert!(restore_plan(true, &spec, None, &snap).is_ok());
        let e = refused(false, &spec, &snap);
        assert!(e.contains("taken under the jailer"), "{e}");
        let qemu = Snapshot {
            backend: "qemu".into(),
            ..snap.clone()
        };
        assert!(refused(true, &spec, &qemu).contains("qemu backend"));
        let small = VmSpec {
            memory_mib: 128,
            ..spec.clone()
        };
        assert!(refused(true, &small, &snap).contains("256 MiB"));
        let rebuilt = VmSpec {
            rootfs: d.path().join("r2"),
            ..spec.clone()
        };
        assert!(refused(true, &rebuilt, &snap).contains("image rebuilt"));
        let in_state = Snapshot {
            memory: SnapshotMemory::InState,
            ..snap.clone()
        };
        assert!(refused(true, &spec, &in_state).contains("no memory file"));
        let qcow = Snapshot {
            disk_format: Some("qcow2".into()),
            ..snap.clone()
        };
        assert!(refused(true, &spec, &qcow).contains("raw disks only"));
        let nic = Snapshot {
            nic_mac: Some([2, 0, 0, 0, 0, 1]),
            ..snap.clone()
        };
        assert!(refused(true, &spec, &nic).contains("must give it"));
        // A NIC by name: the clone runs in its namespace, the TAP replaced by an override.
        let named = Nic {
            tap: crate::Tap::Named {
                name: "tapx".into(),
                netns: "/run/netns/x".into(),
            },
            mac: [2, 0, 0, 0, 0, 1],
        };
        let (_, opts) = restore_plan(true, &spec, Some(&named), &nic).unwrap();
        assert_eq!(opts.netns.as_deref(), Some(Path::new("/run/netns/x")));
        assert_eq!(
            opts.network_overrides,
            vec![api::NetworkOverride {
                iface_id: "eth0".into(),
                host_dev_name: "tapx".into()
            }]
        );
        assert_eq!(opts.nic_mac, Some([2, 0, 0, 0, 0, 1]));
        let other_mac = Nic {
            mac: [2, 0, 0, 0, 0, 9],
            ..named.clone()
        };
        let e = restore_plan(true, &spec, Some(&other_mac), &nic).unwrap_err();
        assert!(e.to_string().contains("02:00:00:00:00:01"), "{e}");
        let e = restore_plan(true, &spec, Some(&named), &snap).unwrap_err();
        assert!(e.to_string().contains("no NIC"), "{e}");
        let fd = Nic {
            tap: crate::Tap::Fd(std::sync::Arc::new(
                std::fs::File::open("/dev/null").unwrap().into(),
            )),
            mac: [2, 0, 0, 0, 0, 1],
        };
        let e = restore_plan(true, &spec, Some(&fd), &nic).unwrap_err();
        assert!(e.to_string().contains("by name"), "{e}");
        std::fs::remove_file(d.path().join(LAUNCH_RECORD)).unwrap();
        assert!(refused(true, &spec, &snap).contains("firecracker.json"));
    }

    #[tokio::test]
    async fn missing_snapshot_files_leave_nothing() {
        let d = tempfile::tempdir().unwrap();
        let vmm = FirecrackerVmm::with_binary("/nonexistent/firecracker");
        let run = d.path().join("vm");
        let spec = VmSpec {
            shares: Vec::new(),
            id: "fc-restore".into(),
            kernel: d.path().join("k"),
            initrd: d.path().join("i"),
            rootfs: d.path().join("r"),
            cpus: 1,
            memory_mib: 128,
            scratch_disk_mib: 0,
            run_dir: run.clone(),
            extra_cmdline: vec![],
            lifetime: crate::Lifetime::Owned,
            memory: Default::default(),
        };
        let e = vmm
            .restore_snapshot(
                &spec,
                &RestoreOptions::default(),
                &SnapshotFiles::in_dir(d.path()),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                VmmError::InputFile {
                    what: "snapshot state",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(!run.exists());
    }
}
