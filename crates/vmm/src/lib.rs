//! The `Vmm` trait and its backends.
//!
//! A [`Vmm`] turns a [`VmSpec`] into a running [`Vm`]; the daemon holds a `Box<dyn Vmm>` and does
//! not care which virtual machine monitor is behind it. Today the only backend is
//! [`QemuVmm`] (QEMU `microvm`, host↔guest channel over virtio-serial) and [`FirecrackerVmm`]
//! (hybrid vsock, optionally jailed), which keep the same contracts:
//!
//! * every host object a VM owns (its process, sockets, console log, scratch disk) lives in the
//!   VM's own `run_dir` or is named `hutch-<id>`, and is removed by id/pid, never by a broad name;
//! * [`Vm::destroy`] leaves nothing behind, and dropping an [`Lifetime::Owned`] [`Vm`] without
//!   destroying it still kills its process and removes its `run_dir` (best effort, synchronously);
//! * an owned VM's process dies with the Hutch process that spawned it (`PR_SET_PDEATHSIG`); a
//!   [`Lifetime::Detached`] one outlives it, and a restarted daemon takes it back with
//!   [`Vmm::adopt`] (or removes it with [`kill_recorded`]), checking the process's start time so
//!   that a recycled pid is never mistaken for the VM;
//! * everything the guest can make the host store (its console) is size-capped.
//!
//! Which accelerator to use is decided by [`probe_accel`], which boots a real guest under KVM
//! rather than trusting that `/dev/kvm` exists.

#![warn(missing_docs)]

mod common;
mod console;
mod error;
pub mod firecracker;
mod host;
pub mod orphans;
mod probe;
mod proc;
mod qemu;
mod qmp;
mod scratch;
mod share;
mod snapshot;
mod spawn;
pub mod timer;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use error::VmmError;
pub use firecracker::{FirecrackerVm, FirecrackerVmm};
pub use host::{find_qemu, host_report, share_support, HostReport, KvmStatus, QemuInfo};
pub use probe::{
    probe_accel, probe_accel_with, AccelOverride, AccelReport, ProbeKey, PROBE_MARKER,
    PROBE_TIMEOUT,
};
pub use proc::kill_recorded;
pub use qemu::{
    format_mac, QemuVm, QemuVmm, CHANNEL_PORT_NAME, CONSOLE_LOG_LIMIT, NIC_NETDEV_ID, SCRATCH_LABEL,
};
pub use share::{find_virtiofsd, VmShare, VIRTIOFSD_PATH};
pub use snapshot::copy_sparse;

/// Everything needed to boot one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// The VM's id ([`validate_id`]: 1–48 characters of `[a-z0-9-]`, not starting with `-`). It names every host
    /// object the VM owns (e.g. the QEMU process is started with `-name hutch-<id>`).
    pub id: String,
    /// The guest kernel (`vmlinuz`, bzImage).
    pub kernel: PathBuf,
    /// The guest initramfs (the agent is PID 1 inside it).
    pub initrd: PathBuf,
    /// The shared base image, attached read-only as the first virtio-blk disk (serial
    /// `hutch-root`).
    pub rootfs: PathBuf,
    /// Number of vCPUs (at least 1).
    pub cpus: u8,
    /// Guest memory in MiB (at least 64).
    pub memory_mib: u32,
    /// Size of the per-VM writable scratch disk in MiB; 0 for none. The disk is a sparse file in
    /// `run_dir`, formatted ext4 with the label [`SCRATCH_LABEL`], attached as a second
    /// virtio-blk disk (serial `hutch-scratch`).
    pub scratch_disk_mib: u64,
    /// The VM's private directory: created by [`Vmm::start`] (which refuses an existing one) and
    /// removed by [`Vm::destroy`]. Holds the sockets, console log, pidfile and scratch disk.
    pub run_dir: PathBuf,
    /// Extra kernel arguments, appended after Hutch's own (so they win where the kernel takes
    /// the last occurrence of a parameter).
    pub extra_cmdline: Vec<String>,
    /// Whether the VM dies with the process that started it ([`Lifetime::Owned`], for `hutch
    /// run`) or outlives it ([`Lifetime::Detached`], for the daemon).
    pub lifetime: Lifetime,
    /// Where the guest's RAM lives.
    pub memory: GuestMemory,
    /// Host directories shared into the guest (QEMU only: one virtiofsd each, and guest RAM
    /// shared with them; such a VM cannot be snapshotted or restored). Backends without
    /// virtio-fs refuse a spec with any.
    pub shares: Vec<VmShare>,
}

/// Where a VM's guest RAM lives.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestMemory {
    /// Anonymous memory private to the VMM process. A snapshot of such a VM carries its RAM.
    #[default]
    Anonymous,
    /// A file the caller owns (e.g. on `/dev/shm`), created if missing and mapped shared: what
    /// the guest writes lands in the file. A template boots this way so that its snapshot can
    /// leave RAM out, and its clones map the file copy-on-write instead of copying it. The VM
    /// never removes the file.
    SharedFile(PathBuf),
}

/// Where a snapshot keeps the guest's RAM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotMemory {
    /// Inside the state file: each restore reads (copies) it.
    InState,
    /// In this file (the VM's [`GuestMemory::SharedFile`]), which must stay unchanged while
    /// the snapshot is in use: each restore maps it private, copy-on-write, so clones share the
    /// pages none of them has written.
    File(PathBuf),
}

/// A VM saved by [`Vm::snapshot`], restorable any number of times by [`Vmm::restore`].
///
/// Its files live in [`Snapshot::dir`], owned by the caller: `vmstate` (device state, and the
/// RAM for [`SnapshotMemory::InState`]), `disk` (the writable disk as it was, never written
/// again: restores put a copy-on-write overlay over it) and `snapshot.json` (this record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The backend that wrote it (only the same backend restores it).
    pub backend: String,
    /// The directory holding its files.
    pub dir: PathBuf,
    /// Where the guest RAM is.
    pub memory: SnapshotMemory,
    /// vCPUs: a restore must ask for the same.
    pub cpus: u8,
    /// Guest memory in MiB: a restore must ask for the same.
    pub memory_mib: u32,
    /// The MAC of the guest's NIC, if it had one: a restore must give it a NIC with this MAC.
    pub nic_mac: Option<[u8; 6]>,
    /// The format of `disk` (`raw` or `qcow2`), `None` when the VM had no writable disk.
    pub disk_format: Option<String>,
    /// The files the VM booted from (`None` in records from before Hutch kept them): a
    /// restore must name the same ones, or the guest's mounted root and page cache would
    /// belong to another filesystem (e.g. after its image was rebuilt).
    #[serde(default)]
    pub boot: Option<BootFiles>,
}

/// The kernel, initrd and root filesystem a VM booted from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootFiles {
    /// [`VmSpec::kernel`].
    pub kernel: PathBuf,
    /// [`VmSpec::initrd`].
    pub initrd: PathBuf,
    /// [`VmSpec::rootfs`].
    pub rootfs: PathBuf,
}

impl BootFiles {
    /// The files `spec` boots from, with symlinks resolved: the same image reached through
    /// another path (a home whose `images` is a link) is the same files. (Images are
    /// content-addressed, so a rebuilt one lives at other paths.)
    pub fn of(spec: &VmSpec) -> BootFiles {
        let real = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        BootFiles {
            kernel: real(&spec.kernel),
            initrd: real(&spec.initrd),
            rootfs: real(&spec.rootfs),
        }
    }
}

impl Snapshot {
    /// The name of the record inside a snapshot's directory.
    pub const RECORD: &'static str = "snapshot.json";

    /// Reads the record a snapshot left in `dir`.
    pub fn load(dir: &Path) -> Result<Snapshot, VmmError> {
        let path = dir.join(Self::RECORD);
        let bytes = std::fs::read(&path).map_err(|e| VmmError::io("read", &path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            VmmError::InvalidSpec(format!("{} is not a snapshot record: {e}", path.display()))
        })
    }

    /// The state file.
    pub fn state_file(&self) -> PathBuf {
        self.dir.join("vmstate")
    }

    /// The frozen writable disk.
    pub fn disk_file(&self) -> PathBuf {
        self.dir.join("disk")
    }
}

/// A network interface for the guest: its TAP device, in the form the backend takes
/// ([`Vmm::opens_tap_by_name`]), and the MAC the guest sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// The TAP device.
    pub tap: Tap,
    /// The guest NIC's MAC address (unicast).
    pub mac: [u8; 6],
}

impl Nic {
    /// Checks that the MAC is a unicast address.
    pub(crate) fn check_mac(&self) -> Result<(), VmmError> {
        if self.mac == [0; 6] || self.mac[0] & 1 != 0 {
            return Err(VmmError::InvalidSpec(format!(
                "NIC MAC {} is not a unicast address",
                format_mac(&self.mac)
            )));
        }
        Ok(())
    }
}

/// How a VMM reaches a NIC's TAP device.
#[derive(Debug, Clone)]
pub enum Tap {
    /// A TAP the caller opened (e.g. inside the sandbox's network namespace, with
    /// `IFF_TAP|IFF_NO_PI|IFF_VNET_HDR`), for a VMM that stays in the host namespace. The VMM
    /// process gets its own copy of the descriptor, and only that process: the caller's
    /// descriptor is never inherited by anything else, and the caller may drop it once
    /// [`Vmm::start_with_nic`] has returned. On QEMU the NIC is a `virtio-net-device` on a
    /// `-netdev tap,fd=N,vhost=off`.
    Fd(Arc<OwnedFd>),
    /// A persistent TAP that nobody holds open, by name, in the network namespace whose file is
    /// `netns` (e.g. `/run/netns/<name>`): the VMM runs inside that namespace and opens the TAP
    /// itself (Firecracker's `TUNSETIFF`, which fails with `EBUSY` while any other descriptor
    /// holds a single-queue TAP). Deleting the namespace removes the TAP.
    Named {
        /// The TAP's interface name inside `netns`.
        name: String,
        /// The network namespace file.
        netns: PathBuf,
    },
}

impl PartialEq for Tap {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Tap::Fd(a), Tap::Fd(b)) => Arc::ptr_eq(a, b),
            (
                Tap::Named { name, netns },
                Tap::Named {
                    name: n2,
                    netns: ns2,
                },
            ) => name == n2 && netns == ns2,
            _ => false,
        }
    }
}

impl Eq for Tap {}

/// How a VM's life is tied to the Hutch process that started it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lifetime {
    /// The VM dies with its starter (`PR_SET_PDEATHSIG`), and dropping its [`Vm`] handle kills it
    /// and removes its `run_dir`.
    #[default]
    Owned,
    /// The VM runs in a session of its own and survives its starter's death (even `kill -9`);
    /// dropping its [`Vm`] handle only releases the handle. Only [`Vm::destroy`] (or
    /// [`kill_recorded`]) stops it; [`Vmm::adopt`] takes it back. Its console is captured only
    /// while some process holds a handle on it.
    Detached,
}

/// The CPU accelerator a VM runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization through `/dev/kvm` (`-accel kvm -cpu host`).
    Kvm,
    /// QEMU's software emulator (`-accel tcg,thread=multi -cpu max`): slower, but works anywhere.
    Tcg,
}

impl Accel {
    /// The lowercase name, as used by `HUTCH_ACCEL` and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A virtual machine monitor backend: boots VMs from specs.
#[async_trait]
pub trait Vmm: Send + Sync {
    /// The backend's name, e.g. `"qemu"`.
    fn name(&self) -> &'static str;

    /// Whether VMs can keep their RAM in a caller's file ([`GuestMemory::SharedFile`]), so
    /// that a snapshot leaves RAM out and restores share its pages.
    fn shares_memory_files(&self) -> bool {
        false
    }

    /// Whether VMs can have shared folders ([`VmSpec::shares`]): QEMU's virtio-fs.
    fn supports_shares(&self) -> bool {
        false
    }

    /// Whether the backend takes a NIC's TAP by name ([`Tap::Named`]: it enters the TAP's
    /// namespace and opens the TAP itself, so the caller must not hold it open) rather than as
    /// an open descriptor ([`Tap::Fd`]). Each backend refuses the other form.
    fn opens_tap_by_name(&self) -> bool {
        false
    }

    /// Whether the backend boots only an uncompressed ELF `vmlinux` (Firecracker on x86_64
    /// refuses a bzImage); the caller then names one as [`VmSpec::kernel`].
    fn needs_elf_kernel(&self) -> bool {
        false
    }

    /// Boots a VM. Returns once the VMM process is up and the host end of the guest channel
    /// exists (not when the guest has booted: the caller waits for the agent's hello on the
    /// channel). On error nothing is left behind: no process, no `run_dir`.
    async fn start(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, VmmError>;

    /// As [`Vmm::start`], with a network interface when `nic` is given (without one the guest
    /// has no network device at all, as with [`Vmm::start`]). The NIC lives inside the VMM
    /// process from then on: it survives the caller's descriptor being closed, a detached VM's
    /// starter dying, and [`Vmm::adopt`] (which has nothing to do for it). Backends without
    /// NIC support refuse a `Some` with [`VmmError::InvalidSpec`].
    async fn start_with_nic(
        &self,
        spec: &VmSpec,
        nic: Option<&Nic>,
    ) -> Result<Box<dyn Vm>, VmmError> {
        match nic {
            None => self.start(spec).await,
            Some(_) => Err(VmmError::InvalidSpec(format!(
                "the {} backend does not support NICs",
                self.name()
            ))),
        }
    }

    /// Takes back a running [`Lifetime::Detached`] VM, e.g. after a daemon restart: finds its
    /// process from the record in `run_dir` and checks that it is alive and really that VM (its
    /// arguments name `id` and `run_dir`, its start time matches the recorded one), so a recycled
    /// pid is never mistaken for it. Fails with [`VmmError::Gone`] if the VM is not running.
    /// The returned handle is detached: dropping it releases it, [`Vm::destroy`] removes the VM.
    async fn adopt(&self, id: &str, run_dir: &Path) -> Result<Box<dyn Vm>, VmmError>;

    /// Starts a VM from `snapshot` instead of booting: `spec` gives its new id, run dir and
    /// lifetime, and must name the same kernel, initrd, rootfs, vCPUs and memory as the VM the
    /// snapshot came from (`spec.memory` and `spec.scratch_disk_mib` are ignored: the RAM and
    /// disk come from the snapshot). The VM gets its own copy-on-write overlay of the
    /// snapshot's disk in its run dir, and comes back **paused**, exactly as it was saved:
    /// call [`Vm::resume`], then give the guest a fresh identity. `nic` must carry the
    /// snapshot's MAC. On error nothing is left behind.
    async fn restore(
        &self,
        spec: &VmSpec,
        nic: Option<&Nic>,
        snapshot: &Snapshot,
    ) -> Result<Box<dyn Vm>, VmmError> {
        let _ = (spec, nic, snapshot);
        Err(VmmError::Unsupported("restoring snapshots"))
    }
}

/// A running VM, held by exactly one holder.
///
/// Dropping an owned VM's handle without calling [`Vm::destroy`] still SIGKILLs its process and
/// removes its `run_dir`, synchronously and best effort; dropping a detached VM's handle leaves
/// the VM running.
#[async_trait]
pub trait Vm: Send + Sync + std::fmt::Debug {
    /// The VM's id (from [`VmSpec::id`]).
    fn id(&self) -> &str;

    /// The VMM process id on the host.
    fn pid(&self) -> u32;

    /// When the VMM process started, in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
    /// With [`Vm::pid`] it names the process exactly: record both to find or kill it later.
    fn start_time(&self) -> u64;

    /// The VM's helper processes (a share's virtiofsd), each as (pid, start time): they die
    /// with the VM; record them beside [`Vm::pid`] to find or kill them after a crash.
    fn helpers(&self) -> Vec<(u32, u64)> {
        Vec::new()
    }

    /// The accelerator the VM runs under.
    fn accel(&self) -> Accel;

    /// The VM's private directory.
    fn run_dir(&self) -> &Path;

    /// The file the guest's serial console is copied into. Guest-controlled content, capped at
    /// [`CONSOLE_LOG_LIMIT`] bytes.
    fn console_log(&self) -> &Path;

    /// Whether the VMM process has exited (guest powered off, crashed, or was killed).
    fn has_exited(&self) -> bool;

    /// Connects to the host end of the guest channel. Everything read from it is
    /// guest-controlled. Only one connection is served at a time; a second one waits until the
    /// first is closed, and a new one may be made after the previous one closed (e.g. by a
    /// restarted daemon).
    async fn connect_channel(&self) -> Result<tokio::net::UnixStream, VmmError>;

    /// Freezes the guest's vCPUs (QMP `stop`) and confirms it with `query-status`. Its memory
    /// and host objects stay; the guest channel stops answering until [`Vm::resume`].
    async fn pause(&self) -> Result<(), VmmError>;

    /// Lets a paused guest run again (QMP `cont`) and confirms it with `query-status`.
    async fn resume(&self) -> Result<(), VmmError>;

    /// Whether the guest is paused, as QEMU reports it (`query-status`).
    async fn is_paused(&self) -> Result<bool, VmmError>;

    /// Saves the **paused** VM into `dir` (created; must not exist) and leaves it paused. See
    /// [`Snapshot`] for what is written; RAM is left out when the VM's memory is a
    /// [`GuestMemory::SharedFile`]. On error `dir` is removed.
    async fn snapshot(&self, dir: &Path) -> Result<Snapshot, VmmError> {
        let _ = dir;
        Err(VmmError::Unsupported("snapshots"))
    }

    /// Stops the VM (a clean QMP `quit`, then SIGKILL by pid), reaps its process and removes its
    /// `run_dir`.
    async fn destroy(self: Box<Self>) -> Result<(), VmmError>;
}

/// Checks that `id` is usable in host object names ([`hutch_types::check_host_id`], the rule
/// the sandbox's network holds its id to as well).
pub fn validate_id(id: &str) -> Result<(), VmmError> {
    hutch_types::check_host_id(id).map_err(|why| VmmError::InvalidId {
        id: id.chars().take(80).collect(),
        why,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("sbx-01").is_ok());
        assert!(validate_id("a").is_ok());
        for bad in ["", "-x", "A", "a_b", "a/b", "a b", "é", &"a".repeat(64)] {
            assert!(validate_id(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn trait_objects() {
        fn takes(_: Option<Box<dyn Vmm>>, _: Option<Box<dyn Vm>>) {}
        takes(None, None);
    }
}
