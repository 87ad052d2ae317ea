//! The QEMU `microvm` backend.
//!
//! One VM is one `qemu-system-x86_64 -M microvm,acpi=on` process, started with `-name
//! hutch-<id>` so it can be found in `ps`, and owning one directory:
//!
//! ```text
//! RUN_DIR/channel.sock   host end of the virtio-serial port "hutch.0" (the agent's channel)
//! RUN_DIR/qmp.sock       QMP: readiness, a clean `quit`, pause and resume
//! RUN_DIR/console.sock   detached VMs only: the serial console, for the handle holder to copy
//! RUN_DIR/console.log    the serial console (ttyS0), copied by Hutch, size-capped
//! RUN_DIR/qemu.pid       QEMU's pidfile
//! RUN_DIR/identity.json  {id, pid, start_time}: how adopt and the reconciler know the process
//! RUN_DIR/scratch.ext4   the writable scratch disk (sparse, ext4 labelled "hutch-scratch")
//! ```
//!
//! A VM started with a [`Nic`] gets `-netdev tap,id=net0,fd=N,vhost=off -device
//! virtio-net-device,netdev=net0,mac=…`: `N` is a close-on-exec duplicate of the caller's TAP
//! descriptor that only the QEMU child inherits. Without one there is no network device at all
//! (`-nodefaults`).
//!
//! An owned VM's console is QEMU's stdout, a pipe copied into `console.log`. A detached VM must
//! not depend on a pipe whose reader dies with the daemon, so its console is a listening socket
//! (`server=on,wait=on`: QEMU does not start the guest until the first reader connects, so the
//! boot log is complete). Whoever holds the VM's handle copies that socket into `console.log`
//! under the same cap; while nobody does (the daemon is down), QEMU discards console output
//! instead of blocking the guest, and [`Vmm::adopt`] reconnects and appends. Either way the guest
//! cannot make the host store more than [`CONSOLE_LOG_LIMIT`] bytes of console.
//!
//! virtio-mmio devices are discovered by the guest through ACPI (`acpi=on`), so no
//! `virtio_mmio.device=` kernel arguments are needed. Disks carry virtio serials (`hutch-root`,
//! `hutch-scratch`) because their order under ACPI discovery is not a contract.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::process::Child;
use tokio::task::JoinHandle;

use crate::common::{
    check_readable, is_socket, vm_core_getters, write_identity, RunDirGuard, VmCore, VmIdentity,
    REAP_TIMEOUT,
};
use crate::console::spawn_copier;
use crate::proc::{remove_run_dir, Proc};
use crate::snapshot::{
    copy_sparse, create_dir, flatten, freeze, make_overlay, receive_stream, send_file, write_record,
};
use crate::spawn::{spawn, StderrTail};
use crate::timer::{host_tsc, tcg_timer_args, HostTsc};
use crate::{
    find_qemu, validate_id, Accel, BootFiles, GuestMemory, Lifetime, Nic, Snapshot, SnapshotMemory,
    Tap, Vm, VmSpec, Vmm, VmmError,
};

/// The virtio-serial port name the guest agent looks for (`/sys/class/virtio-ports/*/name`).
pub const CHANNEL_PORT_NAME: &str = "hutch.0";

/// The ext4 label of the scratch disk; the guest agent mounts the disk by this label.
pub const SCRATCH_LABEL: &str = "hutch-scratch";

/// The QEMU `-netdev` id of the guest's NIC.
pub const NIC_NETDEV_ID: &str = "net0";

/// `aa:bb:cc:dd:ee:ff`, as QEMU's `mac=` property and sysfs write it.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The most bytes of guest console kept in `console.log` (8 MiB).
pub const CONSOLE_LOG_LIMIT: u64 = 8 << 20;

/// How long QEMU gets to create its sockets.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a clean QMP `quit` may take before SIGKILL.
const QUIT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a QMP `stop`/`cont`/`query-status` may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long saving or loading a snapshot's state may take.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);
/// x86 `COMMAND_LINE_SIZE` minus the terminating NUL.
const CMDLINE_MAX: usize = 2047;

/// Seccomp policy for QEMU: no exec/fork, no privilege changes, no obsolete syscalls, no
/// scheduler/affinity changes. A guest that escapes into QEMU gets less.
const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The QEMU `microvm` backend.
#[derive(Debug, Clone)]
pub struct QemuVmm {
    qemu: PathBuf,
    accel: Accel,
    timer_args: bool,
}

impl QemuVmm {
    /// A backend using `qemu-system-x86_64` from `$HUTCH_QEMU` or `$PATH`, running every VM under
    /// `accel` (decide it with [`crate::probe_accel`]).
    pub fn new(accel: Accel) -> Result<Self, VmmError> {
        Ok(Self::with_binary(find_qemu()?, accel))
    }

    /// A backend using the given QEMU binary.
    pub fn with_binary(qemu: PathBuf, accel: Accel) -> Self {
        Self {
            qemu,
            accel,
            timer_args: true,
        }
    }

    /// Leaves out the TCG timer-calibration arguments (see [`crate::timer`]); for measuring
    /// and debugging only: without them TCG boots stall in calibration (3 of 8 measured boots stalled for over 30 s).
    pub fn without_timer_args(mut self) -> Self {
        self.timer_args = false;
        self
    }

    /// The accelerator VMs run under.
    pub fn accel(&self) -> Accel {
        self.accel
    }
}

/// The files of one VM inside its run dir.
#[derive(Debug, Clone)]
pub(crate) struct RunPaths {
    pub dir: PathBuf,
    pub channel: PathBuf,
    pub qmp: PathBuf,
    pub console_sock: PathBuf,
    pub console: PathBuf,
    pub pidfile: PathBuf,
    pub identity: PathBuf,
    pub scratch: PathBuf,
    pub overlay: PathBuf,
    pub migrate: PathBuf,
}

impl RunPaths {
    pub(crate) fn new(dir: &Path) -> Result<Self, VmmError> {
        let sockets = ["channel.sock", "qmp.sock", "console.sock", "migrate.sock"];
        let dir = crate::common::run_dir(dir, &sockets)?;
        Ok(RunPaths {
            channel: dir.join("channel.sock"),
            qmp: dir.join("qmp.sock"),
            console_sock: dir.join("console.sock"),
            console: dir.join("console.log"),
            pidfile: dir.join("qemu.pid"),
            identity: dir.join("identity.json"),
            scratch: dir.join("scratch.ext4"),
            overlay: dir.join("scratch.qcow2"),
            migrate: dir.join("migrate.sock"),
            dir,
        })
    }
}

/// A path as a QEMU option value: UTF-8 only, with `,` doubled (QEMU's escape).
fn opt_path(p: &Path) -> Result<String, VmmError> {
    let s = p
        .to_str()
        .ok_or_else(|| VmmError::InvalidSpec(format!("path is not UTF-8: {}", p.display())))?;
    Ok(s.replace(',', ",,"))
}

/// A path as a plain QEMU argument (no option parsing): UTF-8 only.
fn plain_path(p: &Path) -> Result<String, VmmError> {
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| VmmError::InvalidSpec(format!("path is not UTF-8: {}", p.display())))
}

/// The guest kernel command line: console and panic behaviour, TCG timer arguments, then the
/// caller's extras.
pub(crate) fn kernel_cmdline(
    accel: Accel,
    tsc: Option<HostTsc>,
    extra: &[String],
) -> Result<String, VmmError> {
    // console=ttyS0: the microvm ISA serial port, captured to console.log.
    // panic=-1 reboot=t: on panic reboot at once, and with -no-reboot QEMU then exits, so a dead
    // guest becomes an exited process instead of a hung one; reboot=t uses the triple-fault
    // method, which needs no firmware support.
    let mut args: Vec<String> = ["console=ttyS0", "panic=-1", "reboot=t"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if accel == Accel::Tcg {
        if let Some(tsc) = tsc {
            args.extend(tcg_timer_args(tsc));
        }
    }
    for a in extra {
        if a.is_empty() || a.chars().any(|c| c.is_control()) {
            return Err(VmmError::InvalidSpec(format!(
                "kernel argument {a:?} is empty or has control characters"
            )));
        }
        args.push(a.clone());
    }
    let line = args.join(" ");
    if line.len() > CMDLINE_MAX {
        return Err(VmmError::InvalidSpec(format!(
            "kernel command line is {} bytes, over the {CMDLINE_MAX}-byte limit",
            line.len()
        )));
    }
    Ok(line)
}

/// The `-accel`/`-cpu` arguments for `accel`.
pub(crate) fn accel_args(accel: Accel) -> [&'static str; 4] {
    match accel {
        Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
        // `max` (all features TCG can emulate) boots the Debian 6.1 cloud kernel on microvm.
        Accel::Tcg => ["-accel", "tcg,thread=multi", "-cpu", "max"],
    }
}

/// The full QEMU argument list for `spec` (without the program name). `nic`: the descriptor
/// number QEMU inherits the TAP under, and the guest MAC.
pub(crate) fn qemu_args(
    spec: &VmSpec,
    paths: &RunPaths,
    accel: Accel,
    cmdline: &str,
    nic: Option<(RawFd, [u8; 6])>,
    restore: Option<&Snapshot>,
) -> Result<Vec<String>, VmmError> {
    let mut a: Vec<String> = Vec::with_capacity(64);
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", &format!("hutch-{}", spec.id)]);
    push(&["-M", "microvm,acpi=on,memory-backend=ram"]);
    push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
    push(&["-sandbox", SANDBOX]);
    push(&accel_args(accel));
    push(&[
        "-smp",
        &spec.cpus.to_string(),
        "-m",
        &spec.memory_mib.to_string(),
    ]);
    push(&["-object", &memory_object(spec, restore)?]);
    push(&["-kernel", &plain_path(&spec.kernel)?]);
    push(&["-initrd", &plain_path(&spec.initrd)?]);
    push(&["-append", cmdline]);
    push(&[
        "-drive",
        &format!(
            "id=root,file={},format=raw,if=none,readonly=on",
            opt_path(&spec.rootfs)?
        ),
        "-device",
        "virtio-blk-device,drive=root,serial=hutch-root",
    ]);
    let scratch = match restore {
        Some(snap) => snap
            .disk_format
            .is_some()
            .then_some((&paths.overlay, "qcow2")),
        None => (spec.scratch_disk_mib > 0).then_some((&paths.scratch, "raw")),
    };
    if let Some((file, format)) = scratch {
        push(&[
            "-drive",
            &format!(
                "id=scratch,file={},format={format},if=none,discard=unmap",
                opt_path(file)?
            ),
            "-device",
            "virtio-blk-device,drive=scratch,serial=hutch-scratch",
        ]);
    }
    push(&["-device", "virtio-rng-device"]);
    if !spec.shares.is_empty() {
        // libvhost-user (virtiofsd) serves only virtio 1.0 devices; QEMU's virtio-mmio is
        // legacy (0.9) unless told otherwise. Only VMs with shares change: snapshots of the
        // others keep their devices' shape.
        push(&["-global", "virtio-mmio.force-legacy=false"]);
    }
    for (i, share) in spec.shares.iter().enumerate() {
        let id = format!("fs{i}");
        push(&[
            "-chardev",
            &format!(
                "socket,id={id},path={}",
                opt_path(&crate::share::socket(&paths.dir, i))?
            ),
            "-device",
            &format!("vhost-user-fs-device,chardev={id},tag={}", share.tag),
        ]);
    }
    if let Some((fd, mac)) = nic {
        push(&[
            "-netdev",
            &format!("tap,id={NIC_NETDEV_ID},fd={fd},vhost=off"),
            "-device",
            &format!(
                "virtio-net-device,netdev={NIC_NETDEV_ID},mac={}",
                format_mac(&mac)
            ),
        ]);
    }
    push(&[
        "-device",
        "virtio-serial-device",
        "-chardev",
        &format!(
            "socket,id=hutch0,path={},server=on,wait=off",
            opt_path(&paths.channel)?
        ),
        "-device",
        &format!("virtserialport,chardev=hutch0,name={CHANNEL_PORT_NAME}"),
    ]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=qmp,path={},server=on,wait=off",
            opt_path(&paths.qmp)?
        ),
        "-mon",
        "chardev=qmp,mode=control",
    ]);
    // The console goes to QEMU's stdout (owned) or a socket (detached), and Hutch copies it into
    // console.log with a size cap (see the module docs); signal=off so a guest's ^C byte is not
    // turned into a signal to QEMU.
    let console = match spec.lifetime {
        Lifetime::Owned => "stdio,id=con,signal=off".to_string(),
        Lifetime::Detached => format!(
            "socket,id=con,path={},server=on,wait=on",
            opt_path(&paths.console_sock)?
        ),
    };
    push(&["-chardev", &console, "-serial", "chardev:con"]);
    push(&["-pidfile", &plain_path(&paths.pidfile)?]);
    if restore.is_some() {
        // Deferred: the x-ignore-shared capability must be set (over QMP) before the stream.
        push(&["-incoming", "defer"]);
    }
    Ok(a)
}

/// The `-object` backing guest RAM (always id `ram`, so every snapshot names its RAM block
/// the same): anonymous, a shared file, or a snapshot's memory file mapped private.
fn memory_object(spec: &VmSpec, restore: Option<&Snapshot>) -> Result<String, VmmError> {
    let size = format!("size={}M", spec.memory_mib);
    let file = match (restore, &spec.memory) {
        (Some(snap), _) => match &snap.memory {
            SnapshotMemory::File(path) => Some((path, "off")),
            SnapshotMemory::InState => None,
        },
        (None, GuestMemory::SharedFile(path)) => Some((path, "on")),
        // virtiofsd maps guest RAM to serve the guest's buffers: it must be shared memory.
        (None, GuestMemory::Anonymous) if !spec.shares.is_empty() => {
            return Ok(format!("memory-backend-memfd,id=ram,{size},share=on"))
        }
        (None, GuestMemory::Anonymous) => None,
    };
    Ok(match file {
        Some((path, share)) => format!(
            "memory-backend-file,id=ram,{size},mem-path={},share={share}",
            opt_path(path)?
        ),
        None => format!("memory-backend-ram,id=ram,{size}"),
    })
}

/// A close-on-exec duplicate of `fd` numbered 3 or above (never a standard stream).
fn cloexec_dup(fd: std::os::fd::BorrowedFd<'_>) -> Result<OwnedFd, VmmError> {
    // SAFETY: F_DUPFD_CLOEXEC on a borrowed, open descriptor returns a new one we own.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if n < 0 {
        return Err(VmmError::InvalidSpec(format!(
            "cannot duplicate the NIC's TAP descriptor: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `n` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Kills and reaps a child that failed to start properly (bounded).
async fn kill_and_reap(child: &mut Child) {
    let _ = child.start_kill();
    let _ = tokio::time::timeout(REAP_TIMEOUT, child.wait()).await;
}

impl QemuVmm {
    /// Starts QEMU for `spec`: a fresh boot, or (with `restore`) an incoming migration from a
    /// snapshot that leaves the VM paused.
    async fn launch(
        &self,
        spec: &VmSpec,
        nic: Option<&Nic>,
        restore: Option<&Snapshot>,
    ) -> Result<Box<dyn Vm>, VmmError> {
        validate_id(&spec.id)?;
        if let Some(nic) = nic {
            nic.check_mac()?;
        }
        if spec.cpus == 0 {
            return Err(VmmError::InvalidSpec("cpus must be at least 1".into()));
        }
        if spec.memory_mib < 64 {
            return Err(VmmError::InvalidSpec(
                "memory_mib must be at least 64".into(),
            ));
        }
        check_readable("kernel", &spec.kernel)?;
        check_readable("initrd", &spec.initrd)?;
        check_readable("rootfs", &spec.rootfs)?;
        crate::share::check(&spec.shares)?;
        if restore.is_some() && !spec.shares.is_empty() {
            return Err(VmmError::InvalidSpec(
                "a VM restored from a snapshot cannot have shared folders".into(),
            ));
        }
        let paths = RunPaths::new(&spec.run_dir)?;
        let tsc = if self.accel == Accel::Tcg && self.timer_args {
            tokio::task::spawn_blocking(host_tsc).await.ok().flatten()
        } else {
            None
        };
        let cmdline = kernel_cmdline(self.accel, tsc, &spec.extra_cmdline)?;
        // QEMU's own copy of the TAP: close-on-exec here, so no other child of this process
        // ever inherits it; `spawn` clears the flag in the QEMU child only. Dropped (in this
        // process) when `start` returns.
        let tap = nic
            .map(|n| match &n.tap {
                Tap::Fd(fd) => cloexec_dup(fd.as_fd()),
                Tap::Named { name, .. } => Err(VmmError::InvalidSpec(format!(
                    "qemu takes an open TAP descriptor, not the TAP {name:.20} by name"
                ))),
            })
            .transpose()?;
        let args = qemu_args(
            spec,
            &paths,
            self.accel,
            &cmdline,
            nic.zip(tap.as_ref()).map(|(n, fd)| (fd.as_raw_fd(), n.mac)),
            restore,
        )?;

        let mut guard = RunDirGuard::create(&paths.dir)?;

        match restore {
            Some(snap) => {
                if let Some(format) = &snap.disk_format {
                    make_overlay(&snap.disk_file(), format, &paths.overlay).await?;
                }
            }
            None if spec.scratch_disk_mib > 0 => {
                crate::scratch::make(&paths.scratch, spec.scratch_disk_mib, None).await?;
            }
            None => {}
        }
        // Each share's virtiofsd listens before QEMU connects to it.
        let mut shares = crate::share::start_all(&spec.shares, &paths.dir, spec.lifetime).await?;

        tracing::debug!(id = %spec.id, qemu = %self.qemu.display(), ?args, "starting qemu");
        let started = Instant::now();
        let mut child = match spawn(
            &self.qemu,
            &args,
            spec.lifetime,
            tap.as_ref().map(|t| t.as_fd()),
        ) {
            Ok(child) => child,
            Err(e) => {
                crate::share::kill_all(&mut shares).await;
                return Err(e);
            }
        };
        drop(tap);
        let pid = child.id().unwrap_or(0);
        // The child is not reaped yet, so this pid is exactly it. 0 if it is gone already: then
        // the loop below reports why.
        let start_time = crate::proc::stat(pid).map_or(0, |s| s.start_time);
        let shape = Shape {
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            nic_mac: nic.map(|n| n.mac),
            boot: Some(BootFiles::of(spec)),
            // A restored VM's RAM is private (anonymous or a private mapping): it travels in
            // the state of any snapshot taken of it.
            shared_memory: match (&spec.memory, restore) {
                (GuestMemory::SharedFile(path), None) => Some(path.clone()),
                _ => None,
            },
        };
        let identity = Identity {
            id: spec.id.clone(),
            pid,
            start_time,
            shape: Some(shape.clone()),
            helpers: shares.iter().map(|s| s.helper.clone()).collect(),
        };
        if let Err(e) = write_identity(&paths.identity, &identity) {
            kill_and_reap(&mut child).await;
            crate::share::kill_all(&mut shares).await;
            return Err(e);
        }
        let stderr = child.stderr.take().expect("stderr is piped");
        let (stderr, stderr_task) = StderrTail::collect(stderr);
        let mut console_task = None;
        if let Some(stdout) = child.stdout.take() {
            match spawn_copier(stdout, &paths.console, CONSOLE_LOG_LIMIT, false) {
                Ok(t) => console_task = Some(t),
                Err(e) => {
                    kill_and_reap(&mut child).await;
                    return Err(e);
                }
            }
        }

        // Ready when both sockets exist and QMP answers, i.e. QEMU has loaded the kernel and
        // initrd and opened the disks. Sockets alone are not enough: QEMU creates them before
        // it checks the kernel. A detached VM's QEMU waits for its console reader first.
        let ready: Result<(), VmmError> = loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    let _ = tokio::time::timeout(Duration::from_secs(2), stderr_task).await;
                    if let Some(t) = console_task {
                        t.abort();
                    }
                    crate::share::kill_all(&mut shares).await;
                    return Err(VmmError::QemuExited {
                        status: status.to_string(),
                        stderr: stderr.one_line(),
                    });
                }
                Ok(None) => {}
                Err(e) => break Err(VmmError::io("wait for qemu", &self.qemu, e)),
            }
            if console_task.is_none() && is_socket(&paths.console_sock) {
                if let Ok(sock) = tokio::net::UnixStream::connect(&paths.console_sock).await {
                    match spawn_copier(sock, &paths.console, CONSOLE_LOG_LIMIT, false) {
                        Ok(t) => console_task = Some(t),
                        Err(e) => break Err(e),
                    }
                }
            }
            if console_task.is_some() && is_socket(&paths.channel) && is_socket(&paths.qmp) {
                // A failed check here usually means QEMU is exiting: loop to collect why.
                let left = START_TIMEOUT.saturating_sub(started.elapsed());
                if let Ok(Ok(())) = tokio::time::timeout(left, crate::qmp::ready(&paths.qmp)).await
                {
                    break Ok(());
                }
            }
            if started.elapsed() > START_TIMEOUT {
                break Err(VmmError::StartTimeout {
                    what: format!("{} and {}", paths.channel.display(), paths.qmp.display()),
                    secs: START_TIMEOUT.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let ready = match (ready, restore) {
            (Ok(()), Some(snap)) => incoming(&mut child, &paths, snap, &spec.id, &stderr).await,
            (ready, _) => ready,
        };
        let mut tasks = vec![stderr_task];
        tasks.extend(console_task);
        if let Err(e) = ready {
            kill_and_reap(&mut child).await;
            crate::share::kill_all(&mut shares).await;
            tasks.iter().for_each(JoinHandle::abort);
            return Err(e);
        }
        tracing::info!(id = %spec.id, pid, accel = %self.accel, lifetime = ?spec.lifetime, restored = restore.is_some(), ms = started.elapsed().as_millis() as u64, "qemu started");
        guard.keep();
        let who = VmIdentity {
            id: &spec.id,
            pid,
            start_time,
            lifetime: spec.lifetime,
            dir: &paths.dir,
        };
        Ok(Box::new(QemuVm {
            core: VmCore::new(who, Proc::Child(child), tasks, stderr),
            accel: self.accel,
            paths,
            shape: Some(shape),
            shares,
        }))
    }
}

#[async_trait]
impl Vmm for QemuVmm {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn shares_memory_files(&self) -> bool {
        true
    }

    fn supports_shares(&self) -> bool {
        true
    }

    async fn start(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, VmmError> {
        self.start_with_nic(spec, None).await
    }

    async fn start_with_nic(
        &self,
        spec: &VmSpec,
        nic: Option<&Nic>,
    ) -> Result<Box<dyn Vm>, VmmError> {
        self.launch(spec, nic, None).await
    }

    async fn restore(
        &self,
        spec: &VmSpec,
        nic: Option<&Nic>,
        snapshot: &Snapshot,
    ) -> Result<Box<dyn Vm>, VmmError> {
        check_restorable(spec, nic, snapshot)?;
        self.launch(spec, nic, Some(snapshot)).await
    }

    async fn adopt(&self, id: &str, run_dir: &Path) -> Result<Box<dyn Vm>, VmmError> {
        let paths = RunPaths::new(run_dir)?;
        let (identity, found) =
            crate::proc::find_recorded::<Identity>(id, &paths.dir, &paths.identity)?;
        let gone = |why: String| crate::proc::gone(id, &paths.dir, why);
        let pid = found.pid;
        let name = format!("hutch-{id}");
        if !found.has("-name", &name) || !found.has("-pidfile", &plain_path(&paths.pidfile)?) {
            return Err(gone(format!(
                "pid {pid} is not {name} with run dir {}",
                paths.dir.display()
            )));
        }
        if !found.has("-serial", "chardev:con") || !is_socket(&paths.console_sock) {
            return Err(VmmError::NotDetached(id.to_string()));
        }
        let accel = match found
            .args
            .windows(2)
            .any(|w| w[0] == "-accel" && w[1].starts_with("kvm"))
        {
            true => Accel::Kvm,
            false => Accel::Tcg,
        };
        let console = tokio::net::UnixStream::connect(&paths.console_sock)
            .await
            .map_err(|source| VmmError::Connect {
                path: paths.console_sock.clone(),
                source,
            })?;
        let shares = crate::share::adopt(&identity.helpers, &paths.dir).map_err(gone)?;
        let copier = spawn_copier(console, &paths.console, CONSOLE_LOG_LIMIT, true)?;
        tracing::info!(id, pid, %accel, shares = shares.len(), "adopted qemu");
        let core = VmCore::adopted(id, &paths.dir, identity.start_time, found, vec![copier]);
        Ok(Box::new(QemuVm {
            core,
            accel,
            paths,
            shape: identity.shape,
            shares,
        }))
    }
}

/// Checks that `snapshot` can be restored as `spec` with `nic`, before touching the host.
fn check_restorable(spec: &VmSpec, nic: Option<&Nic>, snap: &Snapshot) -> Result<(), VmmError> {
    crate::snapshot::check_restore("qemu", spec, nic, snap)?;
    check_readable("snapshot state", &snap.state_file())?;
    if snap.disk_format.is_some() {
        check_readable("snapshot disk", &snap.disk_file())?;
    }
    if let SnapshotMemory::File(path) = &snap.memory {
        check_readable("snapshot memory", path)?;
    }
    Ok(())
}

/// `migrate-set-capabilities` arguments: RAM in shared files left out of the stream, or not.
fn ignore_shared_caps(on: bool) -> serde_json::Value {
    serde_json::json!({"capabilities": [{"capability": "x-ignore-shared", "state": on}]})
}

/// Feeds the snapshot's state to a QEMU started with `-incoming`, and waits until the VM is
/// loaded (paused, as it was saved) or QEMU gives up.
async fn incoming(
    child: &mut Child,
    paths: &RunPaths,
    snap: &Snapshot,
    id: &str,
    stderr: &StderrTail,
) -> Result<(), VmmError> {
    let failed = |detail: String| VmmError::Snapshot {
        id: id.to_string(),
        detail,
    };
    let load = async {
        let qmp_err = |command, source| VmmError::Qmp {
            id: id.to_string(),
            command,
            source,
        };
        let mut qmp = crate::qmp::Session::open(&paths.qmp)
            .await
            .map_err(|e| qmp_err("qmp_capabilities", e))?;
        let ignore_shared = matches!(snap.memory, SnapshotMemory::File(_));
        qmp.execute(
            "migrate-set-capabilities",
            ignore_shared_caps(ignore_shared),
        )
        .await
        .map_err(|e| qmp_err("migrate-set-capabilities", e))?;
        let uri = format!("unix:{}", plain_path(&paths.migrate)?);
        qmp.execute("migrate-incoming", serde_json::json!({ "uri": uri }))
            .await
            .map_err(|e| qmp_err("migrate-incoming", e))?;
        send_file(&snap.state_file(), &paths.migrate).await?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(failed(format!(
                    "qemu exited while loading the state ({status}): {}",
                    stderr.one_line()
                )));
            }
            // One QMP client at a time: poll on the session that started the load.
            match qmp.execute("query-status", serde_json::json!({})).await {
                Ok(s) => match s["status"].as_str().unwrap_or("") {
                    "inmigrate" => {}
                    "paused" | "running" => return Ok(()),
                    other => return Err(failed(format!("after loading, the VM is {other:?}"))),
                },
                // QMP fails when QEMU exits: wait for it, and the next round reports why.
                Err(_) => {
                    let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(MIGRATE_TIMEOUT, load)
        .await
        .map_err(|_| failed(format!("loading took over {MIGRATE_TIMEOUT:?}")))?
}

/// The record in `identity.json`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Identity {
    id: String,
    pid: u32,
    start_time: u64,
    /// Absent in records written before snapshots existed.
    #[serde(default)]
    shape: Option<Shape>,
    /// The VM's virtiofsd processes, one per share (absent before shares existed).
    #[serde(default)]
    helpers: Vec<crate::share::Helper>,
}

/// What a snapshot of the VM must record about it, kept so an adopted VM can be snapshotted.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Shape {
    cpus: u8,
    memory_mib: u32,
    nic_mac: Option<[u8; 6]>,
    /// The [`GuestMemory::SharedFile`] the VM was booted with.
    shared_memory: Option<PathBuf>,
    /// What it booted from (absent in records of older Hutch versions).
    #[serde(default)]
    boot: Option<BootFiles>,
}

/// A VM run (or adopted) by [`QemuVmm`].
pub struct QemuVm {
    core: VmCore,
    accel: Accel,
    paths: RunPaths,
    /// `None` for a VM adopted from a record older than snapshots (it cannot be snapshotted).
    shape: Option<Shape>,
    /// The shares' virtiofsd processes (killed after QEMU).
    shares: Vec<crate::share::ShareProc>,
}

impl std::fmt::Debug for QemuVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuVm")
            .field("core", &self.core)
            .field("accel", &self.accel)
            .finish()
    }
}

impl QemuVm {
    fn snapshot_error(&self, detail: String) -> VmmError {
        VmmError::Snapshot {
            id: self.core.id.clone(),
            detail,
        }
    }

    /// Migrates the paused VM's state into `dir/vmstate` (RAM left out when it lives in a shared
    /// file), freezes a copy of its writable disk as `dir/disk`, and writes the record.
    async fn save(&self, dir: &Path, shape: &Shape) -> Result<Snapshot, VmmError> {
        let snapshot = Snapshot {
            backend: "qemu".into(),
            dir: dir.to_path_buf(),
            memory: match &shape.shared_memory {
                Some(path) => SnapshotMemory::File(path.clone()),
                None => SnapshotMemory::InState,
            },
            cpus: shape.cpus,
            memory_mib: shape.memory_mib,
            nic_mac: shape.nic_mac,
            disk_format: None,
            boot: shape.boot.clone(),
        };
        let _ = std::fs::remove_file(&self.paths.migrate);
        let listener = tokio::net::UnixListener::bind(&self.paths.migrate)
            .map_err(|e| VmmError::io("listen on", &self.paths.migrate, e))?;
        let state = snapshot.state_file();
        let receive = receive_stream(listener, &state);
        let migrate = self.migrate_out(shape.shared_memory.is_some());
        let run = async { tokio::try_join!(receive, migrate) };
        let (bytes, ()) = tokio::time::timeout(MIGRATE_TIMEOUT, run)
            .await
            .map_err(|_| self.snapshot_error(format!("saving took over {MIGRATE_TIMEOUT:?}")))??;
        freeze(&state)?;
        let disk = [(&self.paths.overlay, "qcow2"), (&self.paths.scratch, "raw")]
            .into_iter()
            .find(|(p, _)| p.exists());
        let snapshot = Snapshot {
            disk_format: disk.map(|(_, f)| f.to_string()),
            ..snapshot
        };
        match disk {
            // An overlay: flattened, so this snapshot outlives whatever it reads through to.
            Some((disk, "qcow2")) => flatten(disk, &snapshot.disk_file()).await?,
            Some((disk, _)) => copy_sparse(disk, &snapshot.disk_file()).await?,
            None => {}
        }
        if disk.is_some() {
            freeze(&snapshot.disk_file())?;
        }
        write_record(&snapshot)?;
        tracing::info!(id = %self.core.id, dir = %dir.display(), bytes, "snapshot saved");
        Ok(snapshot)
    }

    /// Tells QEMU to migrate to the `migrate.sock` listener and waits until it has finished.
    async fn migrate_out(&self, ignore_shared: bool) -> Result<(), VmmError> {
        let qmp_err = |command, source| VmmError::Qmp {
            id: self.core.id.clone(),
            command,
            source,
        };
        let mut qmp = crate::qmp::Session::open(&self.paths.qmp)
            .await
            .map_err(|e| qmp_err("qmp_capabilities", e))?;
        qmp.execute(
            "migrate-set-capabilities",
            ignore_shared_caps(ignore_shared),
        )
        .await
        .map_err(|e| qmp_err("migrate-set-capabilities", e))?;
        let uri = format!("unix:{}", plain_path(&self.paths.migrate)?);
        qmp.execute("migrate", serde_json::json!({ "uri": uri }))
            .await
            .map_err(|e| qmp_err("migrate", e))?;
        loop {
            let info = qmp
                .execute("query-migrate", serde_json::json!({}))
                .await
                .map_err(|e| qmp_err("query-migrate", e))?;
            match info["status"].as_str().unwrap_or("") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    return Err(self.snapshot_error(format!(
                        "migration {}: {}",
                        info["status"],
                        info["error-desc"].as_str().unwrap_or("no reason given")
                    )))
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// QEMU's stderr so far (first 16 KiB), condensed to one line. Empty for an adopted VM.
    pub fn qemu_stderr(&self) -> String {
        self.core.stderr.one_line()
    }

    /// Runs a QMP `command` (none for just a query) and returns the status it leaves.
    async fn qmp_status(&self, command: &'static str) -> Result<String, VmmError> {
        let what = if command.is_empty() {
            "query-status"
        } else {
            command
        };
        let err = |source| VmmError::Qmp {
            id: self.core.id.clone(),
            command: what,
            source,
        };
        if self.has_exited() {
            return Err(VmmError::NotRunning(self.core.id.clone()));
        }
        let run = crate::qmp::command_then_status(&self.paths.qmp, command);
        match tokio::time::timeout(QMP_TIMEOUT, run).await {
            Ok(Ok(status)) => Ok(status),
            Ok(Err(e)) if self.has_exited() => {
                tracing::debug!(id = %self.core.id, error = %e, "QMP failed: VM gone");
                Err(VmmError::NotRunning(self.core.id.clone()))
            }
            Ok(Err(e)) => Err(err(e)),
            Err(_) => Err(err(std::io::ErrorKind::TimedOut.into())),
        }
    }

    /// Runs `command` and checks that QEMU then reports `want`.
    async fn set_status(&self, command: &'static str, want: &str) -> Result<(), VmmError> {
        let status = self.qmp_status(command).await?;
        if status != want {
            return Err(VmmError::Qmp {
                id: self.core.id.clone(),
                command,
                source: std::io::Error::other(format!("status is {status:?}, not {want:?}")),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Vm for QemuVm {
    vm_core_getters!();

    fn accel(&self) -> Accel {
        self.accel
    }

    fn helpers(&self) -> Vec<(u32, u64)> {
        self.shares
            .iter()
            .map(|s| (s.helper.pid, s.helper.start_time))
            .collect()
    }

    async fn connect_channel(&self) -> Result<tokio::net::UnixStream, VmmError> {
        self.core.check_running()?;
        tokio::net::UnixStream::connect(&self.paths.channel)
            .await
            .map_err(|source| VmmError::Connect {
                path: self.paths.channel.clone(),
                source,
            })
    }

    async fn pause(&self) -> Result<(), VmmError> {
        self.set_status("stop", "paused").await
    }

    async fn resume(&self) -> Result<(), VmmError> {
        self.set_status("cont", "running").await
    }

    async fn is_paused(&self) -> Result<bool, VmmError> {
        // After a snapshot QEMU reports `postmigrate`: still stopped, and `cont` resumes it.
        Ok(matches!(
            self.qmp_status("").await?.as_str(),
            "paused" | "postmigrate"
        ))
    }

    async fn snapshot(&self, dir: &Path) -> Result<Snapshot, VmmError> {
        if !self.shares.is_empty() {
            return Err(self.snapshot_error(
                "it has shared folders: virtiofsd's state (the guest's open files) cannot be \
                 saved, so a sandbox with shares cannot be templated, forked or suspended"
                    .into(),
            ));
        }
        let shape = self.shape.clone().ok_or_else(|| {
            self.snapshot_error(
                "the VM was started by an older Hutch that did not record its shape".into(),
            )
        })?;
        if !self.is_paused().await? {
            return Err(self.snapshot_error("the VM must be paused first".into()));
        }
        create_dir(dir)?;
        let saved = self.save(dir, &shape).await;
        let _ = std::fs::remove_file(&self.paths.migrate);
        if saved.is_err() {
            let _ = std::fs::remove_dir_all(dir);
        }
        saved
    }

    async fn destroy(mut self: Box<Self>) -> Result<(), VmmError> {
        // A clean quit first, so QEMU flushes the scratch disk and removes its sockets.
        let qmp = self.paths.qmp.clone();
        let quit = async move {
            match tokio::time::timeout(QUIT_TIMEOUT, crate::qmp::quit(&qmp)).await {
                Ok(done) => done.map_err(|e| format!("QMP quit: {e}")),
                Err(_) => Err("QMP quit timed out".into()),
            }
        };
        self.core.end(quit, QUIT_TIMEOUT).await?;
        crate::share::kill_all(&mut self.shares).await;
        remove_run_dir(&self.paths.dir)
    }
}

impl Drop for QemuVm {
    /// Owned: best effort, synchronous: SIGKILL by pid, reap (up to 2 s), remove the run dir.
    /// Detached: releases the handle only (stops copying the console); the VM keeps running.
    fn drop(&mut self) {
        if self.core.release() {
            crate::share::kill_all_blocking(&mut self.shares);
            let _ = std::fs::remove_dir_all(&self.paths.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(run_dir: &str) -> VmSpec {
        VmSpec {
            shares: Vec::new(),
            id: "sbx-1".into(),
            kernel: "/k/vmlinuz".into(),
            initrd: "/k/initrd.img".into(),
            rootfs: "/images/root,v1.img".into(),
            cpus: 2,
            memory_mib: 512,
            scratch_disk_mib: 1024,
            run_dir: run_dir.into(),
            extra_cmdline: vec!["hutch.debug=1".into()],
            lifetime: Lifetime::Owned,
            memory: GuestMemory::Anonymous,
        }
    }

    /// A minimal spec whose kernel, initrd and rootfs are all the readable file `f`.
    fn file_spec(f: &Path, run_dir: &Path) -> VmSpec {
        VmSpec {
            shares: Vec::new(),
            id: "t".into(),
            kernel: f.into(),
            initrd: f.into(),
            rootfs: f.into(),
            cpus: 1,
            memory_mib: 128,
            scratch_disk_mib: 0,
            run_dir: run_dir.into(),
            extra_cmdline: vec![],
            lifetime: Lifetime::Owned,
            memory: GuestMemory::Anonymous,
        }
    }

    const TSC: HostTsc = HostTsc {
        khz: 2_596_144,
        invariant: true,
    };

    #[test]
    fn command_line() {
        let spec = spec("/run/hutch/vms/sbx-1");
        let paths = RunPaths::new(&spec.run_dir).unwrap();
        let cmdline = kernel_cmdline(Accel::Tcg, Some(TSC), &spec.extra_cmdline).unwrap();
        assert_eq!(
            cmdline,
            "console=ttyS0 panic=-1 reboot=t tsc_early_khz=2596144 lpj=10384576 tsc=reliable \
             no_timer_check hutch.debug=1"
        );
        let args = qemu_args(&spec, &paths, Accel::Tcg, &cmdline, None, None)
            .unwrap()
            .join(" ");
        let want = [
            "-name hutch-sbx-1 -M microvm,acpi=on,memory-backend=ram -nodefaults -no-user-config -nographic -no-reboot",
            "-accel tcg,thread=multi -cpu max -smp 2 -m 512",
            "-kernel /k/vmlinuz -initrd /k/initrd.img -append console=ttyS0",
            // A comma in a path is doubled for QEMU's option parser.
            "-drive id=root,file=/images/root,,v1.img,format=raw,if=none,readonly=on -device virtio-blk-device,drive=root,serial=hutch-root",
            "-drive id=scratch,file=/run/hutch/vms/sbx-1/scratch.ext4,format=raw,if=none,discard=unmap -device virtio-blk-device,drive=scratch,serial=hutch-scratch",
            "-device virtio-rng-device",
            "-device virtio-serial-device -chardev socket,id=hutch0,path=/run/hutch/vms/sbx-1/channel.sock,server=on,wait=off -device virtserialport,chardev=hutch0,name=hutch.0",
            "-chardev socket,id=qmp,path=/run/hutch/vms/sbx-1/qmp.sock,server=on,wait=off -mon chardev=qmp,mode=control",
            "-chardev stdio,id=con,signal=off -serial chardev:con",
            "-pidfile /run/hutch/vms/sbx-1/qemu.pid",
        ];
        for w in want {
            assert!(args.contains(w), "missing {w:?} in\n{args}");
        }
        assert!(args.contains("-sandbox on,"));
    }

    #[test]
    fn kvm_gets_host_cpu_and_no_timer_args() {
        let spec = spec("/r/x");
        let paths = RunPaths::new(&spec.run_dir).unwrap();
        let cmdline = kernel_cmdline(Accel::Kvm, Some(TSC), &[]).unwrap();
        assert_eq!(cmdline, "console=ttyS0 panic=-1 reboot=t");
        let args = qemu_args(&spec, &paths, Accel::Kvm, &cmdline, None, None)
            .unwrap()
            .join(" ");
        assert!(args.contains("-accel kvm -cpu host"));
    }

    #[test]
    fn memory_backends_and_restores() {
        let mut spec = spec("/r/x");
        let paths = RunPaths::new(&spec.run_dir).unwrap();
        let args = |spec: &VmSpec, snap: Option<&Snapshot>| {
            qemu_args(spec, &paths, Accel::Tcg, "console=ttyS0", None, snap)
                .unwrap()
                .join(" ")
        };
        let boot = args(&spec, None);
        assert!(
            boot.contains("-M microvm,acpi=on,memory-backend=ram"),
            "{boot}"
        );
        assert!(
            boot.contains("-object memory-backend-ram,id=ram,size=512M"),
            "{boot}"
        );
        assert!(!boot.contains("-incoming"), "{boot}");
        spec.memory = GuestMemory::SharedFile("/dev/shm/t,1.mem".into());
        let template = args(&spec, None);
        assert!(
            template.contains(
                "memory-backend-file,id=ram,size=512M,mem-path=/dev/shm/t,,1.mem,share=on"
            ),
            "{template}"
        );
        let mut snap = Snapshot {
            backend: "qemu".into(),
            dir: "/s".into(),
            memory: SnapshotMemory::File("/dev/shm/t.mem".into()),
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            nic_mac: None,
            disk_format: Some("raw".into()),
            boot: None,
        };
        // A clone maps the template's file private, whatever its own spec says, and writes
        // only its own overlay.
        let clone = args(&spec, Some(&snap));
        assert!(
            clone.contains("mem-path=/dev/shm/t.mem,share=off"),
            "{clone}"
        );
        assert!(clone.contains("-incoming defer"), "{clone}");
        assert!(clone.contains("scratch.qcow2,format=qcow2"), "{clone}");
        assert!(!clone.contains("scratch.ext4"), "{clone}");
        snap.memory = SnapshotMemory::InState;
        snap.disk_format = None;
        let child = args(&spec, Some(&snap));
        assert!(child.contains("memory-backend-ram,id=ram"), "{child}");
        assert!(!child.contains("id=scratch"), "{child}");
    }

    #[test]
    fn shares_get_shared_memory_modern_mmio_and_a_device_each() {
        let mut spec = spec("/r/x");
        spec.shares = vec![crate::VmShare {
            tag: "hutch-share-0".into(),
            host_dir: "/srv/s".into(),
            writable: false,
        }];
        let paths = RunPaths::new(&spec.run_dir).unwrap();
        let args = qemu_args(&spec, &paths, Accel::Tcg, "console=ttyS0", None, None)
            .unwrap()
            .join(" ");
        for want in [
            "-object memory-backend-memfd,id=ram,size=512M,share=on",
            "-global virtio-mmio.force-legacy=false",
            "-chardev socket,id=fs0,path=/r/x/fs0.sock -device vhost-user-fs-device,chardev=fs0,tag=hutch-share-0",
        ] {
            assert!(args.contains(want), "{want:?} missing in {args}");
        }
        spec.shares.clear();
        let args = qemu_args(&spec, &paths, Accel::Tcg, "console=ttyS0", None, None)
            .unwrap()
            .join(" ");
        assert!(
            !args.contains("force-legacy") && !args.contains("memfd"),
            "{args}"
        );
    }

    #[test]
    fn nic_is_a_tap_netdev_with_the_inherited_fd() {
        let spec = spec("/r/x");
        let paths = RunPaths::new(&spec.run_dir).unwrap();
        let mac = [0x06, 0x00, 0xac, 0x10, 0x00, 0x02];
        let args = qemu_args(
            &spec,
            &paths,
            Accel::Tcg,
            "console=ttyS0",
            Some((7, mac)),
            None,
        )
        .unwrap()
        .join(" ");
        assert!(
            args.contains(
                "-netdev tap,id=net0,fd=7,vhost=off -device virtio-net-device,netdev=net0,mac=06:00:ac:10:00:02"
            ),
            "{args}"
        );
        // Without a NIC: no network device at all (-nodefaults leaves none).
        let args = qemu_args(&spec, &paths, Accel::Tcg, "console=ttyS0", None, None)
            .unwrap()
            .join(" ");
        assert!(args.contains("-nodefaults"));
        assert!(
            !args.contains("-netdev") && !args.contains("virtio-net"),
            "{args}"
        );
    }

    #[tokio::test]
    async fn start_with_nic_refuses_a_multicast_mac() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let vmm = QemuVmm::with_binary("/nonexistent/qemu".into(), Accel::Tcg);
        let s = file_spec(&f, &dir.path().join("vm"));
        let tap = std::sync::Arc::new(OwnedFd::from(std::fs::File::open(&f).unwrap()));
        for mac in [[1, 0, 0, 0, 0, 1], [0; 6]] {
            let nic = Nic {
                tap: Tap::Fd(tap.clone()),
                mac,
            };
            let err = vmm.start_with_nic(&s, Some(&nic)).await.unwrap_err();
            assert!(matches!(err, VmmError::InvalidSpec(_)), "{err:?}");
        }
        assert!(!dir.path().join("vm").exists());
    }

    #[test]
    fn no_scratch_disk_when_zero() {
        let mut spec = spec("/r/x");
        spec.scratch_disk_mib = 0;
        let paths = RunPaths::new(&spec.run_dir).unwrap();
        let args = qemu_args(&spec, &paths, Accel::Tcg, "console=ttyS0", None, None).unwrap();
        assert!(!args.join(" ").contains("scratch"));
    }

    #[test]
    fn socket_path_limit() {
        let long = format!("/tmp/{}", "d".repeat(100));
        match RunPaths::new(Path::new(&long)) {
            Err(VmmError::SocketPathTooLong { len, max: 107, .. }) => assert!(len > 107),
            other => panic!("expected SocketPathTooLong, got {other:?}"),
        }
        // 107 bytes exactly fits.
        let dir = format!("/{}", "d".repeat(107 - "/channel.sock".len() - 1));
        assert_eq!(Path::new(&dir).join("channel.sock").as_os_str().len(), 107);
        assert!(RunPaths::new(Path::new(&dir)).is_ok());
    }

    #[test]
    fn relative_run_dir_becomes_absolute() {
        let p = RunPaths::new(Path::new("rel/x")).unwrap();
        assert!(p.dir.is_absolute());
        assert!(p.channel.starts_with(&p.dir));
    }

    #[test]
    fn bad_kernel_args() {
        assert!(kernel_cmdline(Accel::Tcg, None, &["a\nb".into()]).is_err());
        assert!(kernel_cmdline(Accel::Tcg, None, &["".into()]).is_err());
        assert!(kernel_cmdline(Accel::Tcg, None, &["x".repeat(3000)]).is_err());
    }

    #[tokio::test]
    async fn start_validates_before_touching_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let vmm = QemuVmm::with_binary("/nonexistent/qemu".into(), Accel::Tcg);
        let mut s = spec(dir.path().join("vm").to_str().unwrap());
        s.kernel = dir.path().join("missing-vmlinuz");
        let err = vmm.start(&s).await.unwrap_err();
        assert!(
            matches!(err, VmmError::InputFile { what: "kernel", .. }),
            "{err:?}"
        );
        assert!(!dir.path().join("vm").exists());
        s.id = "Bad_Id".into();
        assert!(matches!(
            vmm.start(&s).await.unwrap_err(),
            VmmError::InvalidId { .. }
        ));
    }

    #[tokio::test]
    async fn missing_qemu_is_a_clear_error_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let vmm = QemuVmm::with_binary(dir.path().join("no-qemu"), Accel::Tcg);
        let s = file_spec(&f, &dir.path().join("vm"));
        let err = vmm.start(&s).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "qemu-system-x86_64 not found: install it with apt-get install qemu-system-x86"
        );
        assert!(!dir.path().join("vm").exists());
    }

    #[tokio::test]
    async fn refuses_existing_run_dir() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        std::fs::create_dir(dir.path().join("vm")).unwrap();
        std::fs::write(dir.path().join("vm/keep"), b"x").unwrap();
        let vmm = QemuVmm::with_binary("/bin/false".into(), Accel::Tcg);
        let s = file_spec(&f, &dir.path().join("vm"));
        assert!(matches!(
            vmm.start(&s).await.unwrap_err(),
            VmmError::RunDirExists(_)
        ));
        assert!(
            dir.path().join("vm/keep").exists(),
            "must not touch a dir it did not create"
        );
    }

    #[test]
    fn detached_console_is_a_waiting_socket() {
        let mut spec = spec("/r/x");
        spec.lifetime = Lifetime::Detached;
        let paths = RunPaths::new(&spec.run_dir).unwrap();
        let args = qemu_args(&spec, &paths, Accel::Tcg, "console=ttyS0", None, None)
            .unwrap()
            .join(" ");
        assert!(
            args.contains(
                "-chardev socket,id=con,path=/r/x/console.sock,server=on,wait=on -serial chardev:con"
            ),
            "{args}"
        );
        assert!(!args.contains("stdio"));
    }

    #[tokio::test]
    async fn adopt_refuses_what_is_not_the_vm() {
        let dir = tempfile::tempdir().unwrap();
        let run_dir = dir.path().join("vm");
        std::fs::create_dir(&run_dir).unwrap();
        let vmm = QemuVmm::with_binary("/nonexistent/qemu".into(), Accel::Tcg);
        let adopt = |vmm: QemuVmm, run_dir: PathBuf| async move {
            match vmm.adopt("sbx-1", &run_dir).await {
                Ok(vm) => panic!("adopted {vm:?}"),
                Err(e) => e,
            }
        };
        let write = |pid: u32, start_time: u64| {
            let id = Identity {
                id: "sbx-1".into(),
                pid,
                start_time,
                shape: None,
                helpers: Vec::new(),
            };
            std::fs::write(
                run_dir.join("identity.json"),
                serde_json::to_vec(&id).unwrap(),
            )
            .unwrap();
        };
        let why = |e: VmmError| match e {
            VmmError::Gone { why, .. } => why,
            other => panic!("expected Gone, got {other:?}"),
        };
        assert_eq!(
            why(adopt(vmm.clone(), run_dir.clone()).await),
            "no identity.json"
        );

        // A dead pid: a child of ours, reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        #[allow(clippy::disallowed_methods)] // `true` exits at once.
        child.wait().unwrap();
        write(dead, 1);
        let w = why(adopt(vmm.clone(), run_dir.clone()).await);
        assert!(w.starts_with(&format!("pid {dead}")), "{w}");

        // A live process with the right start time that is not the VM (this test).
        let me = std::process::id();
        let start = crate::proc::stat(me).unwrap().start_time;
        write(me, start);
        let w = why(adopt(vmm.clone(), run_dir.clone()).await);
        assert!(w.contains("is not hutch-sbx-1"), "{w}");
        // … and with a wrong start time.
        write(me, start + 1);
        let w = why(adopt(vmm.clone(), run_dir.clone()).await);
        assert!(w.contains("not at the recorded"), "{w}");
        assert!(run_dir.exists(), "adopt never removes anything");
    }
}
