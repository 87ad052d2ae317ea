//! The Firecracker backend: a typed client for its v1.16 HTTP API ([`FirecrackerClient`],
//! bodies in [`api`]), launch directly or through the jailer ([`JailerConfig`]), and the guest
//! channel over hybrid vsock ([`connect_hybrid_vsock`], guest port [`GUEST_CHANNEL_PORT`]).
//!
//! One VM is one `firecracker --api-sock … --id <id>` process owning one run dir:
//!
//! ```text
//! RUN_DIR/api.sock        the API socket (jailed: a symlink to the jail's /api.sock)
//! RUN_DIR/vsock.sock      the hybrid vsock socket (jailed: a symlink to the jail's /v.sock)
//! RUN_DIR/console.log     the serial console (firecracker's stdout), copied by Hutch, capped
//! RUN_DIR/identity.json   {id, pid, start_time, jail}: how adopt and destroy find everything
//! RUN_DIR/scratch.ext4    the writable scratch disk (jailed: in the jail instead)
//! ```
//!
//! The writable disk is named so that a snapshot's clones each get their own (Firecracker
//! reopens a snapshot's drives by the paths it recorded, and a load cannot change them): jailed,
//! `/scratch.ext4` inside the jail, a different file in every jail; direct, the descriptor
//! [`SCRATCH_FD`] that Hutch opens on the VM's own file and firecracker inherits, so the drive
//! is `/proc/self/fd/<SCRATCH_FD>` in every process.
//!
//! Firecracker's kernel must be an ELF `vmlinux` (v1.16 refuses a bzImage): the backend says so
//! ([`Vmm::needs_elf_kernel`]) and refuses anything else; the caller names the `vmlinux` that
//! `hutch image build` extracted (core's `kernel_for`). x86_64 guests find the virtio-mmio devices through ACPI. The guest kernel needs (built in, or as modules loaded by
//! the initramfs): `VIRTIO_MMIO`, `VIRTIO_BLK`, `VIRTIO_VSOCKETS` (+ `VSOCKETS`), `HW_RANDOM_VIRTIO`,
//! `EXT4_FS`, `OVERLAY_FS`, `SERIAL_8250_CONSOLE`, `ACPI`; `SERIO_I8042` and `KEYBOARD_ATKBD` for
//! a clean stop by Ctrl-Alt-Del; `PVH` for the faster PVH boot entry.
//!
//! A NIC is a TAP by name ([`crate::Tap::Named`]; [`Vmm::opens_tap_by_name`]): firecracker
//! runs inside the TAP's network namespace (jailed: the jailer's `--netns`; direct: `setns` in
//! the child before exec) and opens the TAP there itself, as interface [`NIC_IFACE_ID`] with
//! the guest's MAC; a restore points `network_overrides` at the clone's TAP. Jailed, a
//! dynamically linked firecracker's interpreter and libraries (as `ldd` lists them) are copied
//! into the chroot first.
//!
//! The process is tracked by exact pid (a child handle, or a pidfd for a jailed or adopted one)
//! and stopped through the API (`SendCtrlAltDel`; with `reboot=k` the guest's reset ends
//! Firecracker), then SIGKILL by pid — never by name. Destroy removes the run dir, the jail and
//! its cgroups.

pub mod api;
mod client;
mod error;
mod jailer;
mod snapshot;
mod vsock;

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::process::Child;
use tokio::task::JoinHandle;

pub use client::{FirecrackerClient, RawResponse};
pub use error::{ApiFault, FirecrackerError, VsockError};
pub use jailer::{detect_cgroup_version, CgroupVersion, JailerConfig};
pub use snapshot::{RestoreOptions, SnapshotFiles};
pub use vsock::connect_hybrid_vsock;

use crate::common::{
    check_readable, is_socket, vm_core_getters, write_identity, RunDirGuard, VmCore, VmIdentity,
    REAP_TIMEOUT,
};
use crate::console::spawn_copier;
use crate::proc::{remove_run_dir, PidFd, Proc};
use crate::spawn::{condense, StderrTail};
use crate::{
    validate_id, Accel, BootFiles, GuestMemory, Lifetime, Nic, Snapshot, Tap, Vm, VmSpec, Vmm,
    VmmError, CONSOLE_LOG_LIMIT,
};

/// The guest vsock port the agent listens on for the host's channel (the host dials it with
/// `CONNECT 1024`): the protocol's [`hutch_protocol::VSOCK_PORT`].
pub const GUEST_CHANNEL_PORT: u32 = hutch_protocol::VSOCK_PORT;

/// The guest's vsock context id. Every VM may use the same one: each Firecracker process has its
/// own vsock device, and the host side is a per-VM Unix socket, not the host's vsock namespace.
pub const GUEST_CID: u32 = 3;

/// The kernel command line before the caller's extras: serial console (captured), reset on
/// panic, `reboot=k` so a guest reboot ends Firecracker, no PCI probing, no i8042 probing delays.
/// It replaces Firecracker's default, which has `nomodule` (our initramfs loads modules).
pub const BASE_BOOT_ARGS: &str =
    "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.dumbkbd";

/// The `iface_id` of the guest NIC that [`Vmm::start_with_nic`] configures (and that a
/// restore's `network_overrides` names).
pub const NIC_IFACE_ID: &str = "eth0";

/// The descriptor under which a directly launched firecracker inherits its writable disk; the
/// drive's path is `/proc/self/fd/10`, the same in every process restored from a snapshot.
pub const SCRATCH_FD: i32 = 10;

/// How long Firecracker gets to answer on its API socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a clean stop (Ctrl-Alt-Del) may take before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How long one hybrid-vsock CONNECT may take.
const CONNECT_ATTEMPT: Duration = Duration::from_secs(3);
/// How long `connect_channel` keeps dialling a guest whose agent is not listening yet.
const CHANNEL_TIMEOUT: Duration = Duration::from_secs(120);
/// x86 `COMMAND_LINE_SIZE` minus the terminating NUL.
const CMDLINE_MAX: usize = 2047;

/// `firecracker` from `$FIRECRACKER_BIN`, else from `$PATH`.
pub fn find_firecracker() -> Result<PathBuf, FirecrackerError> {
    find_binary("FIRECRACKER_BIN", "firecracker", None)
}

/// `jailer` from `$JAILER_BIN`, else from `$PATH`.
pub fn find_jailer() -> Result<PathBuf, FirecrackerError> {
    find_binary("JAILER_BIN", "jailer", None)
}

/// `firecracker` as [`find_firecracker`] finds it, else in `dir` (`$HUTCH_HOME/bin`, where
/// `hutch setup firecracker` installs it).
pub fn find_firecracker_or_in(dir: &Path) -> Result<PathBuf, FirecrackerError> {
    find_binary("FIRECRACKER_BIN", "firecracker", Some(dir))
}

/// `jailer` as [`find_jailer`] finds it, else in `dir`.
pub fn find_jailer_or_in(dir: &Path) -> Result<PathBuf, FirecrackerError> {
    find_binary("JAILER_BIN", "jailer", Some(dir))
}

fn find_binary(
    env: &'static str,
    what: &'static str,
    fallback: Option<&Path>,
) -> Result<PathBuf, FirecrackerError> {
    if let Some(p) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return match p.is_file() {
            true => Ok(p),
            false => Err(FirecrackerError::BinaryNotFound { what, env }),
        };
    }
    crate::host::find_in_path(what)
        .or_else(|| fallback.map(|d| d.join(what)).filter(|p| p.is_file()))
        .ok_or(FirecrackerError::BinaryNotFound { what, env })
}

/// How long `--version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(5);

/// The version a `firecracker` or `jailer` binary reports (`--version`'s first line, e.g.
/// `Firecracker v1.16.1`), bounded by a timeout.
pub async fn binary_version(path: &Path) -> Result<String, FirecrackerError> {
    let fail = |detail: String| FirecrackerError::Version {
        path: path.to_path_buf(),
        detail,
    };
    let out = tokio::process::Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(VERSION_TIMEOUT, out)
        .await
        .map_err(|_| fail(format!("no answer within {}s", VERSION_TIMEOUT.as_secs())))?
        .map_err(|e| fail(e.to_string()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().map(str::trim).find(|l| !l.is_empty());
    match first {
        Some(v) if out.status.success() && v.contains(" v") => Ok(v.to_string()),
        _ => Err(fail(format!("{}: {}", out.status, condense(&text)))),
    }
}

/// Per-VM launch settings beyond the [`VmSpec`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchOptions {
    /// The network namespace to run the VM in (e.g. `/run/netns/<name>`): jailed, the jailer's
    /// `--netns`; direct, firecracker enters it (`setns`) before it starts. Its TAPs are opened
    /// there, by name.
    pub netns: Option<PathBuf>,
    /// Network interfaces (TAPs, which must exist in that namespace).
    pub network_interfaces: Vec<api::NetworkInterface>,
    /// KVM dirty-page tracking, so that diff snapshots hold only the pages written since the
    /// last snapshot (otherwise Firecracker falls back to `mincore`, correct only without swap).
    pub track_dirty_pages: bool,
    /// Firecracker's own log, configured before anything else (paths as Firecracker sees
    /// them: inside the jail when jailed).
    pub logger: Option<api::Logger>,
    /// Firecracker's metrics, configured before anything else (same path rule).
    pub metrics: Option<api::Metrics>,
}

/// The Firecracker backend.
#[derive(Debug, Clone)]
pub struct FirecrackerVmm {
    firecracker: PathBuf,
    jailer: Option<JailerConfig>,
    channel_timeout: Duration,
    /// The shared libraries firecracker needs in a jail (none when static), found at the first
    /// jailed launch.
    libraries: Arc<tokio::sync::OnceCell<Vec<PathBuf>>>,
}

impl FirecrackerVmm {
    /// Direct (no jailer) launches of `firecracker` from `$FIRECRACKER_BIN` or `$PATH`; for
    /// development. Add the jailer with [`FirecrackerVmm::with_jailer`].
    pub fn new() -> Result<Self, VmmError> {
        Ok(Self::with_binary(find_firecracker()?))
    }

    /// Direct launches of the given binary.
    pub fn with_binary(firecracker: impl Into<PathBuf>) -> Self {
        Self {
            firecracker: firecracker.into(),
            jailer: None,
            channel_timeout: CHANNEL_TIMEOUT,
            libraries: Arc::default(),
        }
    }

    /// Launches through the jailer.
    pub fn with_jailer(mut self, jailer: JailerConfig) -> Self {
        self.jailer = Some(jailer);
        self
    }

    /// Bounds how long [`Vm::connect_channel`] dials a guest that does not listen yet.
    pub fn with_channel_timeout(mut self, t: Duration) -> Self {
        self.channel_timeout = t;
        self
    }

    /// The firecracker binary.
    pub fn binary(&self) -> &Path {
        &self.firecracker
    }

    /// Boots a VM as [`Vmm::start`] does, with per-VM network settings.
    pub async fn start_with(
        &self,
        spec: &VmSpec,
        opts: &LaunchOptions,
    ) -> Result<FirecrackerVm, VmmError> {
        validate_id(&spec.id)?;
        if !spec.shares.is_empty() {
            return Err(VmmError::NoShares {
                backend: "firecracker",
            });
        }
        if !(1..=32).contains(&spec.cpus) {
            return Err(VmmError::InvalidSpec("cpus must be 1 to 32".into()));
        }
        if spec.memory_mib < 64 {
            return Err(VmmError::InvalidSpec(
                "memory_mib must be at least 64".into(),
            ));
        }
        if let GuestMemory::SharedFile(f) = &spec.memory {
            return Err(VmmError::InvalidSpec(format!(
                "firecracker cannot keep guest RAM in a file of the caller's ({}): boot with \
                 anonymous memory; its snapshots write the RAM to their own `memory` file",
                f.display()
            )));
        }
        check_readable("kernel", &spec.kernel)?;
        check_readable("initrd", &spec.initrd)?;
        check_readable("rootfs", &spec.rootfs)?;
        let boot = BootFiles::of(spec);
        if !is_elf(&spec.kernel) {
            return Err(FirecrackerError::KernelNotElf(spec.kernel.clone()).into());
        }
        let boot_args = boot_args(&spec.extra_cmdline)?;
        let paths = RunPaths::new(&spec.run_dir)?;
        let mut guard = RunDirGuard::create(&paths.dir)?;
        let started = Instant::now();
        let shape = Shape {
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            nic_mac: match opts.network_interfaces.first() {
                Some(n) => n.guest_mac.as_deref().map(parse_mac).transpose()?,
                None => None,
            },
            scratch: spec.scratch_disk_mib > 0,
            boot: Some(boot),
        };

        let mut vm = match &self.jailer {
            None => {
                // Direct: the disk exists before the process, which inherits it (SCRATCH_FD).
                let scratch = match spec.scratch_disk_mib {
                    0 => None,
                    mib => {
                        crate::scratch::make(&paths.scratch, mib, None).await?;
                        Some(open_scratch(&paths.scratch)?)
                    }
                };
                let netns = opts.netns.as_deref().map(open_netns).transpose()?;
                let inherit = Inherit {
                    scratch: scratch.as_ref(),
                    netns: netns.as_ref(),
                };
                self.launch_direct(spec, &paths, shape, inherit).await?
            }
            Some(j) => self.launch_jailed(j, spec, &paths, opts, shape).await?,
        };
        if let Err(e) = vm.configure(spec, &boot_args, opts).await {
            vm.kill_now().await;
            return Err(e);
        }
        tracing::info!(id = %spec.id, pid = vm.core.pid, jailed = vm.identity.jail.is_some(), ms = started.elapsed().as_millis() as u64, "firecracker started");
        guard.keep();
        Ok(vm)
    }

    /// Spawns firecracker itself and waits for its API.
    async fn launch_direct(
        &self,
        spec: &VmSpec,
        paths: &RunPaths,
        shape: Shape,
        inherit: Inherit<'_>,
    ) -> Result<FirecrackerVm, VmmError> {
        let args = vec![
            "--api-sock".to_string(),
            path_str(&paths.api)?,
            "--id".to_string(),
            spec.id.clone(),
        ];
        let mut child = spawn_vmm(
            &self.firecracker,
            &args,
            spec.lifetime,
            "firecracker",
            inherit,
        )?;
        let pid = child.id().unwrap_or(0);
        let start_time = crate::proc::stat(pid).map_or(0, |s| s.start_time);
        let identity = Identity {
            id: spec.id.clone(),
            pid,
            start_time,
            jail: None,
            shape: Some(shape),
        };
        let (stderr, tasks) = match capture(&mut child, paths) {
            Ok(t) => t,
            Err(e) => {
                let _ = child.start_kill();
                let _ = tokio::time::timeout(REAP_TIMEOUT, child.wait()).await;
                return Err(e);
            }
        };
        let mut vm = FirecrackerVm::new(
            spec,
            paths.clone(),
            identity,
            Proc::Child(child),
            tasks,
            stderr,
            self.channel_timeout,
        );
        let ready = async {
            write_identity(&paths.identity, &vm.identity)?;
            vm.wait_api().await
        };
        if let Err(e) = ready.await {
            vm.kill_now().await;
            return Err(e);
        }
        Ok(vm)
    }

    /// Runs the jailer, then finds firecracker by the jail's pid file and waits for its API.
    async fn launch_jailed(
        &self,
        j: &JailerConfig,
        spec: &VmSpec,
        paths: &RunPaths,
        opts: &LaunchOptions,
        shape: Shape,
    ) -> Result<FirecrackerVm, VmmError> {
        let jail_dir = j.jail_dir(&self.firecracker, &spec.id);
        if jail_dir.exists() {
            return Err(FirecrackerError::Jailer(format!(
                "jail {} exists already (a leak, or another VM with id {})",
                jail_dir.display(),
                spec.id
            ))
            .into());
        }
        // A dynamically linked firecracker needs its libraries in the jail (found once).
        let libs = self
            .libraries
            .get_or_try_init(|| jailer::shared_libraries(&self.firecracker))
            .await?;
        // The jailer canonicalizes its chroot base: it must exist.
        std::fs::create_dir_all(&j.chroot_base)
            .map_err(|e| VmmError::io("create chroot base", &j.chroot_base, e))?;
        let version = j.cgroup_version.unwrap_or_else(detect_cgroup_version);
        let fc_args = vec!["--api-sock".to_string(), "/api.sock".to_string()];
        let args = j.args(
            &self.firecracker,
            &spec.id,
            spec.memory_mib,
            opts.netns.as_deref(),
            version,
            &fc_args,
        );
        let jail = JailRecord {
            dir: jail_dir.clone(),
            root: j.jail_root(&self.firecracker, &spec.id),
            cgroups: j.cgroup_dirs(&self.firecracker, &spec.id, spec.memory_mib, version),
            uid: j.uid,
            gid: j.gid,
        };
        // Record the jail before it exists, so that a crash from here on leaves a record to
        // clean by.
        let mut identity = Identity {
            id: spec.id.clone(),
            pid: 0,
            start_time: 0,
            jail: Some(jail.clone()),
            shape: Some(shape),
        };
        write_identity(&paths.identity, &identity)?;
        if !libs.is_empty() {
            // Before the jailer runs: it copies firecracker into this root and execs it there.
            let copied = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&jail.root)
                .map_err(|e| VmmError::io("create jail root", &jail.root, e))
                .and_then(|()| Ok(jailer::copy_libraries(libs, &jail.root)?));
            if let Err(e) = copied {
                remove_jail(&jail);
                return Err(e);
            }
        }
        let mut jailer = spawn_vmm(
            &j.jailer,
            &args,
            spec.lifetime,
            "jailer",
            Inherit::default(),
        )?;
        let (stderr, tasks) = match capture(&mut jailer, paths) {
            Ok(t) => t,
            Err(e) => {
                let _ = jailer.start_kill();
                let _ = tokio::time::timeout(REAP_TIMEOUT, jailer.wait()).await;
                remove_jail(&jail);
                return Err(e);
            }
        };
        let pid_file = jail.root.join(format!(
            "{}.pid",
            JailerConfig::exec_name(&self.firecracker)
        ));
        let started = Instant::now();
        let mut jailer_status = None;
        // The jailer's exit code is no evidence: wait for the pid file naming a live firecracker.
        let found = loop {
            if jailer_status.is_none() {
                if let Ok(Some(s)) = jailer.try_wait() {
                    jailer_status = Some(s);
                }
            }
            if let Some(pid) = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
            {
                match (PidFd::open(pid), crate::proc::stat(pid)) {
                    (Ok(fd), Some(st)) if !st.zombie => break Ok((pid, st.start_time, fd)),
                    _ => {
                        break Err(FirecrackerError::Exited {
                            status: format!("pid {pid} from {} is gone", pid_file.display()),
                            stderr: stderr.one_line(),
                        })
                    }
                }
            }
            if let Some(s) = jailer_status {
                // Exited without a pid file after a grace for the write to land.
                if started.elapsed() > Duration::from_millis(500) && !pid_file.exists() {
                    break Err(FirecrackerError::Jailer(format!(
                        "exited ({s}) without writing {}: {}",
                        pid_file.display(),
                        stderr.one_line()
                    )));
                }
            }
            if started.elapsed() > START_TIMEOUT {
                break Err(FirecrackerError::StartTimeout {
                    what: format!("write {}", pid_file.display()),
                    ms: START_TIMEOUT.as_millis() as u64,
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        // The jailer (parent of the namespace's init) exits on its own; reap it, bounded.
        let _ = tokio::time::timeout(Duration::from_secs(2), jailer.wait()).await;
        let (pid, start_time, pidfd) = match found {
            Ok(f) => f,
            Err(e) => {
                let _ = jailer.start_kill();
                tasks.iter().for_each(JoinHandle::abort);
                remove_jail(&jail);
                return Err(e.into());
            }
        };
        identity.pid = pid;
        identity.start_time = start_time;
        let mut vm = FirecrackerVm::new(
            spec,
            paths.clone(),
            identity,
            Proc::Pid(pidfd),
            tasks,
            stderr,
            self.channel_timeout,
        );
        let ready = async {
            write_identity(&paths.identity, &vm.identity)?;
            symlink(&jail.root.join("api.sock"), &paths.api)?;
            symlink(&jail.root.join("v.sock"), &paths.vsock)?;
            vm.wait_api().await?;
            // Resources go into the jail once it exists (the jailer makes it).
            let link = |src: &Path, name: &str| {
                jailer::link_into_jail(src, &jail.root.join(name), jail.uid, jail.gid, false)
                    .map_err(|e| VmmError::io("put into jail", src, e))
            };
            link(&spec.kernel, "vmlinux")?;
            link(&spec.initrd, "initrd")?;
            link(&spec.rootfs, "rootfs")?;
            Ok::<(), VmmError>(())
        };
        if let Err(e) = ready.await {
            vm.kill_now().await;
            return Err(e);
        }
        Ok(vm)
    }
}

#[async_trait]
impl Vmm for FirecrackerVmm {
    fn name(&self) -> &'static str {
        "firecracker"
    }

    async fn start(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, VmmError> {
        Ok(Box::new(
            self.start_with(spec, &LaunchOptions::default()).await?,
        ))
    }

    /// Takes NICs by name ([`Tap::Named`]): firecracker opens its TAP itself, inside the TAP's
    /// namespace.
    fn opens_tap_by_name(&self) -> bool {
        true
    }

    fn needs_elf_kernel(&self) -> bool {
        true
    }

    /// With a NIC, firecracker runs in the TAP's namespace ([`LaunchOptions::netns`]) with one
    /// interface [`NIC_IFACE_ID`] on that TAP and the NIC's MAC. An open TAP descriptor
    /// ([`Tap::Fd`]) is refused.
    async fn start_with_nic(
        &self,
        spec: &VmSpec,
        nic: Option<&Nic>,
    ) -> Result<Box<dyn Vm>, VmmError> {
        let opts = match nic {
            None => LaunchOptions::default(),
            Some(nic) => {
                nic.check_mac()?;
                let (name, netns) = named_tap(nic)?;
                LaunchOptions {
                    netns: Some(netns.to_path_buf()),
                    network_interfaces: vec![api::NetworkInterface {
                        iface_id: NIC_IFACE_ID.into(),
                        host_dev_name: name.into(),
                        guest_mac: Some(crate::format_mac(&nic.mac)),
                        mtu: None,
                        rx_rate_limiter: None,
                        tx_rate_limiter: None,
                    }],
                    ..LaunchOptions::default()
                }
            }
        };
        Ok(Box::new(self.start_with(spec, &opts).await?))
    }

    /// A full snapshot restored paused; the writable disk is a copy of the snapshot's. A NIC
    /// (by name, with the snapshot's MAC) replaces the snapshot's TAP through
    /// `network_overrides`, and the VM runs in the new TAP's namespace.
    async fn restore(
        &self,
        spec: &VmSpec,
        nic: Option<&Nic>,
        snapshot: &Snapshot,
    ) -> Result<Box<dyn Vm>, VmmError> {
        Ok(Box::new(self.restore_record(spec, nic, snapshot).await?))
    }

    async fn adopt(&self, id: &str, run_dir: &Path) -> Result<Box<dyn Vm>, VmmError> {
        let paths = RunPaths::new(run_dir)?;
        let (identity, found) =
            crate::proc::find_recorded::<Identity>(id, &paths.dir, &paths.identity)?;
        let gone = |why: String| crate::proc::gone(id, &paths.dir, why);
        let pid = found.pid;
        let sock = match identity.jail {
            Some(_) => "/api.sock".to_string(),
            None => path_str(&paths.api)?,
        };
        if !found.has("--id", id) || !found.has("--api-sock", &sock) {
            return Err(gone(format!(
                "pid {pid} is not firecracker --id {id} with run dir {}",
                paths.dir.display()
            )));
        }
        tracing::info!(id, pid, "adopted firecracker");
        let vm = FirecrackerVm {
            core: VmCore::adopted(id, &paths.dir, identity.start_time, found, Vec::new()),
            client: FirecrackerClient::new(&paths.api),
            identity,
            paths,
            channel_timeout: self.channel_timeout,
        };
        Ok(Box::new(vm))
    }
}

/// The files of one VM inside its run dir.
#[derive(Debug, Clone)]
struct RunPaths {
    dir: PathBuf,
    api: PathBuf,
    vsock: PathBuf,
    console: PathBuf,
    identity: PathBuf,
    scratch: PathBuf,
}

impl RunPaths {
    fn new(dir: &Path) -> Result<Self, VmmError> {
        let dir = crate::common::run_dir(dir, &["api.sock", "vsock.sock"])?;
        Ok(RunPaths {
            api: dir.join("api.sock"),
            vsock: dir.join("vsock.sock"),
            console: dir.join("console.log"),
            identity: dir.join("identity.json"),
            scratch: dir.join("scratch.ext4"),
            dir,
        })
    }
}

/// A jail to clean up: recorded in `identity.json` before the jailer runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct JailRecord {
    /// `<chroot_base>/<exec>/<id>`, removed whole.
    dir: PathBuf,
    /// `dir/root`.
    root: PathBuf,
    /// The cgroup dirs the jailer made, removed (rmdir) once the VM is dead.
    cgroups: Vec<PathBuf>,
    uid: u32,
    gid: u32,
}

/// The record in `identity.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Identity {
    id: String,
    pid: u32,
    start_time: u64,
    #[serde(default)]
    jail: Option<JailRecord>,
    /// What a snapshot of the VM must record (absent for VMs started by an older Hutch).
    #[serde(default)]
    shape: Option<Shape>,
}

/// The VM's shape, as a snapshot of it must record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Shape {
    cpus: u8,
    memory_mib: u32,
    nic_mac: Option<[u8; 6]>,
    /// Whether it has a writable disk (`scratch.ext4`).
    scratch: bool,
    /// What it booted from (absent in records of older Hutch versions).
    #[serde(default)]
    boot: Option<BootFiles>,
}

/// The drive path of a direct VM's writable disk: the descriptor it inherited.
fn scratch_fd_path() -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{SCRATCH_FD}"))
}

/// Opens a VM's writable disk for firecracker to inherit (close-on-exec here: only the
/// firecracker child gets it, under [`SCRATCH_FD`]).
fn open_scratch(path: &Path) -> Result<OwnedFd, VmmError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map(OwnedFd::from)
        .map_err(|e| VmmError::io("open scratch disk", path, e))
}

/// The TAP name and namespace of a NIC given by name, or why firecracker cannot use it.
fn named_tap(nic: &Nic) -> Result<(&str, &Path), VmmError> {
    match &nic.tap {
        Tap::Named { name, netns } => Ok((name, netns)),
        Tap::Fd(_) => Err(VmmError::InvalidSpec(
            "firecracker opens its TAP by name inside the TAP's namespace and cannot use an \
             open TAP descriptor (which would also keep the single-queue TAP busy): give the \
             NIC as Tap::Named"
                .into(),
        )),
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
fn parse_mac(s: &str) -> Result<[u8; 6], VmmError> {
    let bad = || VmmError::InvalidSpec(format!("guest MAC {s:.40} is not aa:bb:cc:dd:ee:ff"));
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    match parts.next() {
        Some(_) => Err(bad()),
        None => Ok(mac),
    }
}

fn symlink(target: &Path, link: &Path) -> Result<(), VmmError> {
    std::os::unix::fs::symlink(target, link).map_err(|e| VmmError::io("symlink", link, e))
}

/// Removes a jail: its directory tree and its cgroups (best effort; the VM must be dead).
fn remove_jail(jail: &JailRecord) {
    if let Err(e) = std::fs::remove_dir_all(&jail.dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %jail.dir.display(), error = %e, "could not remove jail");
        }
    }
    for cg in &jail.cgroups {
        if let Err(e) = std::fs::remove_dir(cg) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(cgroup = %cg.display(), error = %e, "could not remove cgroup");
            }
        }
    }
}

fn path_str(p: &Path) -> Result<String, VmmError> {
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| VmmError::InvalidSpec(format!("path is not UTF-8: {}", p.display())))
}

/// Whether `path` starts with the ELF magic.
fn is_elf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

/// Hutch's boot arguments plus the caller's, checked.
fn boot_args(extra: &[String]) -> Result<String, VmmError> {
    let mut line = BASE_BOOT_ARGS.to_string();
    for a in extra {
        if a.is_empty() || a.chars().any(|c| c.is_control()) {
            return Err(VmmError::InvalidSpec(format!(
                "kernel argument {a:?} is empty or has control characters"
            )));
        }
        line.push(' ');
        line.push_str(a);
    }
    if line.len() > CMDLINE_MAX {
        return Err(VmmError::InvalidSpec(format!(
            "kernel command line is {} bytes, over the {CMDLINE_MAX}-byte limit",
            line.len()
        )));
    }
    Ok(line)
}

/// What a directly launched firecracker gets from Hutch besides its arguments.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Inherit<'a> {
    /// The writable disk, inherited as [`SCRATCH_FD`].
    pub(super) scratch: Option<&'a OwnedFd>,
    /// A network namespace to enter before exec.
    pub(super) netns: Option<&'a OwnedFd>,
}

/// Opens a network namespace file (e.g. `/run/netns/<name>`) for firecracker to enter.
pub(super) fn open_netns(path: &Path) -> Result<OwnedFd, VmmError> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map(OwnedFd::from)
        .map_err(|source| VmmError::InputFile {
            what: "network namespace",
            path: path.to_path_buf(),
            source,
        })
}

/// Spawns firecracker or the jailer with stdin from /dev/null and stderr piped, with what
/// `inherit` names: the scratch disk as [`SCRATCH_FD`], and the network namespace entered. Owned: stdout
/// (the serial console) piped, own process group, `kill_on_drop`, `PR_SET_PDEATHSIG(SIGKILL)`
/// (which reaches a direct firecracker, not one the jailer forked). Detached: a session of its
/// own, stdout on /dev/null (the console of a detached VM is not captured yet).
fn spawn_vmm(
    program: &Path,
    args: &[String],
    lifetime: Lifetime,
    what: &'static str,
    inherit: Inherit<'_>,
) -> Result<Child, VmmError> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stderr(Stdio::piped());
    if let Some(ns) = inherit.netns {
        let ns = ns.as_raw_fd();
        // SAFETY: runs between fork and exec and makes one async-signal-safe syscall, on a
        // descriptor the caller keeps open across the spawn (close-on-exec, so not inherited).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns, libc::CLONE_NEWNET) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    if let Some(fd) = inherit.scratch {
        let fd = fd.as_raw_fd();
        // SAFETY: runs between fork and exec and makes only async-signal-safe syscalls, on a
        // descriptor the caller keeps open across the spawn. dup2 leaves the copy inheritable.
        unsafe {
            cmd.pre_exec(move || {
                let r = if fd == SCRATCH_FD {
                    libc::fcntl(fd, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, SCRATCH_FD)
                };
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    crate::spawn::apply_lifetime(&mut cmd, lifetime);
    cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            let env = if what == "jailer" {
                "JAILER_BIN"
            } else {
                "FIRECRACKER_BIN"
            };
            FirecrackerError::BinaryNotFound { what, env }.into()
        } else {
            VmmError::io("spawn", program, e)
        }
    })
}

/// Starts collecting a spawned process's stderr and (owned VMs) copying its stdout, the serial
/// console, into `console.log`.
fn capture(
    child: &mut Child,
    paths: &RunPaths,
) -> Result<(StderrTail, Vec<JoinHandle<()>>), VmmError> {
    let (stderr, stderr_task) = match child.stderr.take() {
        Some(s) => {
            let (t, task) = StderrTail::collect(s);
            (t, Some(task))
        }
        None => (StderrTail::default(), None),
    };
    let mut tasks: Vec<JoinHandle<()>> = stderr_task.into_iter().collect();
    if let Some(stdout) = child.stdout.take() {
        match spawn_copier(stdout, &paths.console, CONSOLE_LOG_LIMIT, false) {
            Ok(t) => tasks.push(t),
            Err(e) => {
                tasks.iter().for_each(JoinHandle::abort);
                return Err(e);
            }
        }
    }
    Ok((stderr, tasks))
}

/// A VM run (or adopted) by [`FirecrackerVmm`].
pub struct FirecrackerVm {
    core: VmCore,
    identity: Identity,
    paths: RunPaths,
    client: FirecrackerClient,
    channel_timeout: Duration,
}

impl std::fmt::Debug for FirecrackerVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirecrackerVm")
            .field("core", &self.core)
            .field("jail", &self.identity.jail.as_ref().map(|j| &j.dir))
            .finish()
    }
}

impl FirecrackerVm {
    fn new(
        spec: &VmSpec,
        paths: RunPaths,
        identity: Identity,
        proc: Proc,
        tasks: Vec<JoinHandle<()>>,
        stderr: StderrTail,
        channel_timeout: Duration,
    ) -> Self {
        let who = VmIdentity {
            id: &spec.id,
            pid: identity.pid,
            start_time: identity.start_time,
            lifetime: spec.lifetime,
            dir: &paths.dir,
        };
        Self {
            core: VmCore::new(who, proc, tasks, stderr),
            client: FirecrackerClient::new(&paths.api),
            identity,
            paths,
            channel_timeout,
        }
    }

    /// The API client for this VM (snapshots, balloon, rate limiters, metrics, …).
    pub fn client(&self) -> &FirecrackerClient {
        &self.client
    }

    /// The hybrid vsock Unix socket (in the run dir; a symlink into the jail when jailed).
    pub fn vsock_path(&self) -> &Path {
        &self.paths.vsock
    }

    /// The jail directory, when launched through the jailer.
    pub fn jail_dir(&self) -> Option<&Path> {
        self.identity.jail.as_ref().map(|j| j.dir.as_path())
    }

    /// Firecracker's stderr so far (first 16 KiB), condensed to one line.
    pub fn vmm_stderr(&self) -> String {
        self.core.stderr.one_line()
    }

    /// A path as Firecracker sees it: inside the jail, `name` at the jail's root.
    fn vm_path(&self, host: &Path, name: &str) -> PathBuf {
        match self.identity.jail {
            Some(_) => Path::new("/").join(name),
            None => host.to_path_buf(),
        }
    }

    /// Waits until the API socket answers, failing early if the process exits.
    async fn wait_api(&mut self) -> Result<(), VmmError> {
        let started = Instant::now();
        let probe = self.client.clone().with_timeout(Duration::from_millis(500));
        loop {
            if self.has_exited() {
                // Let the stderr collector catch up.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let mut why = self.core.stderr.one_line();
                if why == "no output on stderr" {
                    if let Ok(c) = std::fs::read(&self.paths.console) {
                        why = condense(&String::from_utf8_lossy(&c[..c.len().min(2000)]));
                    }
                }
                return Err(FirecrackerError::Exited {
                    status: "before its API answered".into(),
                    stderr: why,
                }
                .into());
            }
            if is_socket(&self.paths.api) && probe.describe_instance().await.is_ok() {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(FirecrackerError::StartTimeout {
                    what: format!("answer on {}", self.paths.api.display()),
                    ms: START_TIMEOUT.as_millis() as u64,
                }
                .into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Configures the machine, boot source, disks, network, vsock and entropy, and starts it.
    async fn configure(
        &self,
        spec: &VmSpec,
        boot_args: &str,
        opts: &LaunchOptions,
    ) -> Result<(), VmmError> {
        let c = &self.client;
        let jail = self.identity.jail.as_ref();
        self.put_telemetry(opts.logger.as_ref(), opts.metrics.as_ref())
            .await?;
        let mut machine = api::MachineConfig::new(spec.cpus, spec.memory_mib);
        machine.track_dirty_pages = opts.track_dirty_pages.then_some(true);
        c.put_machine_config(&machine).await?;
        c.put_boot_source(&api::BootSource {
            kernel_image_path: self.vm_path(&spec.kernel, "vmlinux"),
            boot_args: Some(boot_args.to_string()),
            initrd_path: Some(self.vm_path(&spec.initrd, "initrd")),
        })
        .await?;
        c.put_drive(&api::Drive::file(
            "root",
            self.vm_path(&spec.rootfs, "rootfs"),
            true,
        ))
        .await?;
        if spec.scratch_disk_mib > 0 {
            let path = match jail {
                Some(j) => {
                    let host = j.root.join("scratch.ext4");
                    crate::scratch::make(&host, spec.scratch_disk_mib, Some((j.uid, j.gid)))
                        .await?;
                    self.vm_path(&host, "scratch.ext4")
                }
                // Made and inherited before the process started.
                None => scratch_fd_path(),
            };
            c.put_drive(&api::Drive::file("scratch", path, false))
                .await?;
        }
        for n in &opts.network_interfaces {
            c.put_network_interface(n).await?;
        }
        c.put_vsock(&api::Vsock {
            guest_cid: GUEST_CID,
            uds_path: self.vm_path(&self.paths.vsock, "v.sock"),
        })
        .await?;
        c.put_entropy(&api::EntropyDevice::default()).await?;
        c.instance_start().await?;
        Ok(())
    }

    /// SIGKILLs the process, reaps it (bounded), stops the tasks and removes the jail: for a
    /// start that failed half-way.
    async fn kill_now(&mut self) {
        self.core.kill_now().await;
        if let Some(j) = &self.identity.jail {
            remove_jail(j);
        }
    }
}

#[async_trait]
impl Vm for FirecrackerVm {
    vm_core_getters!();

    fn accel(&self) -> Accel {
        Accel::Kvm
    }

    /// Dials [`GUEST_CHANNEL_PORT`] over hybrid vsock until the guest's agent listens (bounded
    /// by the backend's channel timeout, and failing as soon as the VM exits).
    async fn connect_channel(&self) -> Result<tokio::net::UnixStream, VmmError> {
        let started = Instant::now();
        loop {
            if self.has_exited() {
                return Err(VmmError::NotRunning(self.core.id.clone()));
            }
            let left = self.channel_timeout.saturating_sub(started.elapsed());
            let attempt = CONNECT_ATTEMPT.min(left).max(Duration::from_millis(1));
            match connect_hybrid_vsock(&self.paths.vsock, GUEST_CHANNEL_PORT, attempt).await {
                Ok(s) => return Ok(s),
                Err(FirecrackerError::Vsock {
                    source: VsockError::BadAnswer(a),
                    path,
                    port,
                }) => {
                    return Err(FirecrackerError::Vsock {
                        source: VsockError::BadAnswer(a),
                        path,
                        port,
                    }
                    .into())
                }
                Err(e) if started.elapsed() >= self.channel_timeout => return Err(e.into()),
                Err(e) => {
                    tracing::trace!(id = %self.core.id, error = %e, "guest not listening yet")
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn pause(&self) -> Result<(), VmmError> {
        self.core.check_running()?;
        self.client.set_vm_state(api::VmState::Paused).await?;
        Ok(())
    }

    async fn resume(&self) -> Result<(), VmmError> {
        self.core.check_running()?;
        self.client.set_vm_state(api::VmState::Resumed).await?;
        Ok(())
    }

    async fn is_paused(&self) -> Result<bool, VmmError> {
        self.core.check_running()?;
        let info = self.client.describe_instance().await?;
        Ok(info.state == api::InstanceState::Paused)
    }

    /// A full snapshot (`vmstate`, `memory`), a frozen sparse copy of the writable disk
    /// (`disk`, raw), and the record. The VM stays paused.
    async fn snapshot(&self, dir: &Path) -> Result<Snapshot, VmmError> {
        self.save(dir).await
    }

    async fn destroy(mut self: Box<Self>) -> Result<(), VmmError> {
        // Through the API first: Ctrl-Alt-Del, and with reboot=k the guest's reset ends
        // Firecracker. A paused or hung guest ignores it; then SIGKILL by pidfd.
        let quick = self.client.clone().with_timeout(Duration::from_secs(1));
        let ctrl_alt_del = async move {
            quick
                .action(api::ActionType::SendCtrlAltDel)
                .await
                .map_err(|e| format!("SendCtrlAltDel: {e}"))
        };
        self.core.end(ctrl_alt_del, STOP_GRACE).await?;
        if let Some(j) = &self.identity.jail {
            remove_jail(j);
        }
        remove_run_dir(&self.paths.dir)
    }
}

impl Drop for FirecrackerVm {
    /// Owned: best effort, synchronous: SIGKILL by pid, reap (up to 2 s), remove the jail and the
    /// run dir. Detached: releases the handle only.
    fn drop(&mut self) {
        if !self.core.release() {
            return;
        }
        if let Some(j) = &self.identity.jail {
            remove_jail(j);
        }
        let _ = std::fs::remove_dir_all(&self.paths.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_args_are_checked() {
        assert_eq!(boot_args(&[]).unwrap(), BASE_BOOT_ARGS);
        assert!(boot_args(&["hutch.debug=1".into()])
            .unwrap()
            .ends_with(" pci=off i8042.noaux i8042.nomux i8042.dumbkbd hutch.debug=1"));
        assert!(!BASE_BOOT_ARGS.contains("nomodule"));
        assert!(boot_args(&["a\nb".into()]).is_err());
        assert!(boot_args(&["".into()]).is_err());
        assert!(boot_args(&["x".repeat(3000)]).is_err());
    }

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("06:00:ac:10:00:02").unwrap(),
            [6, 0, 0xac, 0x10, 0, 2]
        );
        for bad in [
            "",
            "06:00:ac:10:00",
            "06:00:ac:10:00:02:03",
            "6:00:ac:10:00:02",
            "zz:00:ac:10:00:02",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad:?}");
        }
        assert_eq!(scratch_fd_path(), Path::new("/proc/self/fd/10"));
    }

    #[test]
    fn socket_path_limit() {
        let long = format!("/tmp/{}", "d".repeat(100));
        assert!(matches!(
            RunPaths::new(Path::new(&long)),
            Err(VmmError::SocketPathTooLong { .. })
        ));
    }

    #[test]
    fn elf_check() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("k");
        std::fs::write(&f, b"MZ\0\0bzImage").unwrap();
        assert!(!is_elf(&f));
        std::fs::write(&f, b"\x7fELF\x02\x01\x01").unwrap();
        assert!(is_elf(&f));
        assert!(!is_elf(&d.path().join("none")));
    }

    #[test]
    fn finds_binaries_by_env_only_if_they_exist() {
        // Not touching the environment (tests run in parallel): only the PATH lookup's shape.
        match find_binary(
            "HUTCH_TEST_UNSET_VARIABLE",
            "surely-not-a-binary-name",
            None,
        ) {
            Err(FirecrackerError::BinaryNotFound { what, env }) => {
                assert_eq!(what, "surely-not-a-binary-name");
                assert_eq!(env, "HUTCH_TEST_UNSET_VARIABLE");
            }
            other => panic!("{other:?}"),
        }
        // Not on PATH, but in the fallback dir (`$HUTCH_HOME/bin`).
        let d = tempfile::tempdir().unwrap();
        let what = "surely-not-a-binary-name";
        assert!(find_binary("HUTCH_TEST_UNSET_VARIABLE", what, Some(d.path())).is_err());
        std::fs::write(d.path().join(what), b"").unwrap();
        assert_eq!(
            find_binary("HUTCH_TEST_UNSET_VARIABLE", what, Some(d.path())).unwrap(),
            d.path().join(what)
        );
    }

    #[tokio::test]
    async fn versions_are_read_and_checked() {
        let d = tempfile::tempdir().unwrap();
        let fake = d.path().join("fc");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho 'Firecracker v9.9.9'; echo; echo log line\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        assert_eq!(binary_version(&fake).await.unwrap(), "Firecracker v9.9.9");
        let e = binary_version(Path::new("/bin/false")).await.unwrap_err();
        assert!(matches!(e, FirecrackerError::Version { .. }), "{e:?}");
        let e = binary_version(&d.path().join("none")).await.unwrap_err();
        assert!(e.to_string().contains("--version"), "{e}");
    }

    #[test]
    fn identity_round_trips_with_and_without_a_jail() {
        let old: Identity = serde_json::from_str(r#"{"id":"a","pid":1,"start_time":2}"#).unwrap();
        assert!(old.jail.is_none());
        let j = Identity {
            id: "a".into(),
            pid: 1,
            start_time: 2,
            jail: Some(JailRecord {
                dir: "/srv/jailer/firecracker/a".into(),
                root: "/srv/jailer/firecracker/a/root".into(),
                cgroups: vec!["/sys/fs/cgroup/firecracker/a".into()],
                uid: 10,
                gid: 10,
            }),
            shape: Some(Shape {
                cpus: 1,
                memory_mib: 128,
                nic_mac: Some([2, 0, 0, 0, 0, 1]),
                scratch: true,
                boot: None,
            }),
        };
        let back: Identity = serde_json::from_slice(&serde_json::to_vec(&j).unwrap()).unwrap();
        assert_eq!(back.jail, j.jail);
        assert_eq!(back.shape, j.shape);
        assert!(old.shape.is_none(), "an older record has no shape");
    }
}
