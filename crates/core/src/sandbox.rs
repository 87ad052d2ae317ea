//! Boot a VM to a ready agent, and tear it down again.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use hutch_image::Image;
use hutch_protocol::{
    host::{Channel, ChannelError},
    GuestIdentity, NetworkConfig, Setup,
};
use hutch_vmm::{GuestMemory, Lifetime, Nic, Snapshot, Vm, VmShare, VmSpec, Vmm, VmmError};
use rand::RngCore;

use crate::exec::OverCap;

/// How long a clean shutdown through the agent may take before the VM is killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// Bytes of console tail quoted in a boot failure.
const CONSOLE_TAIL: usize = 1500;
/// Bytes of host entropy handed to each guest at boot.
const SEED_BYTES: usize = 64;

/// Why a sandbox could not boot or stop.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The VMM could not start the VM.
    #[error("cannot start the VM")]
    Start(#[source] VmmError),
    /// The VM exited before its agent answered.
    #[error("the VM stopped during boot; console ends with:\n{console}")]
    DiedDuringBoot {
        /// The last lines of the guest console.
        console: String,
    },
    /// The agent did not answer within the boot timeout.
    #[error("the guest agent did not answer within {timeout:?}; console ends with:\n{console}")]
    BootTimeout {
        /// The timeout that passed.
        timeout: Duration,
        /// The last lines of the guest console.
        console: String,
    },
    /// Connecting to the channel or the handshake failed.
    #[error("cannot talk to the guest agent")]
    Channel(#[source] ChannelError),
    /// A shared folder could not be mounted in the guest.
    #[error("cannot mount the share {guest_dir} in the guest: {detail}")]
    Mount {
        /// Where it was to be mounted.
        guest_dir: String,
        /// What went wrong (the guest's words are guest-controlled text, capped).
        detail: String,
    },
    /// The VMM failed to stop the VM cleanly.
    #[error("cannot destroy the VM")]
    Destroy(#[source] VmmError),
}

/// How to boot one sandbox.
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// Sandbox id: names the VM's host objects and its hostname.
    pub id: String,
    /// The guest image.
    pub image: Image,
    /// vCPUs.
    pub cpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Size of the writable disk in MiB (the guest cannot write more than this).
    pub disk_mib: u64,
    /// Parent of the VM's private run dir (`<runs_dir>/<id>`).
    pub runs_dir: PathBuf,
    /// How long to wait for the agent.
    pub boot_timeout: Duration,
    /// Whether the VM outlives this process (the daemon), to be adopted after a restart.
    pub detached: bool,
    /// A network device backed by this TAP, and the configuration the guest gives it.
    pub network: Option<(Nic, NetworkConfig)>,
    /// Where the guest's RAM lives (a template boots with it in a shared file).
    pub memory: GuestMemory,
    /// Host directories shared into the guest, mounted once the agent answers.
    pub shares: Vec<BootShare>,
}

/// A shared folder as a sandbox boots with it.
#[derive(Debug, Clone)]
pub struct BootShare {
    /// The VM's side: tag, host directory, writable or not.
    pub share: VmShare,
    /// Where the guest mounts it.
    pub guest_dir: String,
}

/// A fresh sandbox id: `sb-` and 10 random hex digits.
pub fn new_id() -> String {
    format!("sb-{:010x}", rand::thread_rng().next_u64() & 0xff_ffff_ffff)
}

/// A booted VM with a ready, handshaken agent.
pub struct Sandbox {
    id: String,
    vm: Box<dyn Vm>,
    channel: Arc<Channel>,
    boot_time: Duration,
}

impl Sandbox {
    /// Boots a VM and waits until its agent is ready and set up. On any failure the VM is
    /// destroyed before returning.
    pub async fn boot(vmm: &dyn Vmm, opts: &BootOptions) -> Result<Sandbox, SandboxError> {
        let started = Instant::now();
        let nic = opts.network.as_ref().map(|(nic, _)| nic);
        let vm = vmm
            .start_with_nic(&vm_spec(vmm, opts), nic)
            .await
            .map_err(SandboxError::Start)?;
        let sandbox = Sandbox::finish(vm, opts, started).await?;
        if let Err(e) = mount_shares(&sandbox.channel, &opts.shares).await {
            let _ = sandbox.discard().await;
            return Err(e);
        }
        Ok(sandbox)
    }

    /// Restores a VM from `snapshot` (a template or a fork) and makes it a sandbox of its own:
    /// fresh entropy, clock, hostname and machine-id, and the network configuration pushed
    /// again. `opts.cpus`/`memory_mib` must match the snapshot. On failure the VM is destroyed.
    pub async fn restore(
        vmm: &dyn Vmm,
        opts: &BootOptions,
        snapshot: &Snapshot,
    ) -> Result<Sandbox, SandboxError> {
        let started = Instant::now();
        let nic = opts.network.as_ref().map(|(nic, _)| nic);
        let vm = vmm
            .restore(&vm_spec(vmm, opts), nic, snapshot)
            .await
            .map_err(SandboxError::Start)?;
        if let Err(e) = vm.resume().await {
            let _ = vm.destroy().await;
            return Err(SandboxError::Start(e));
        }
        Sandbox::finish(vm, opts, started).await
    }

    /// Attaches to a started VM, pushes its network configuration and gives it its identity.
    async fn finish(
        vm: Box<dyn Vm>,
        opts: &BootOptions,
        started: Instant,
    ) -> Result<Sandbox, SandboxError> {
        let mut sandbox = Sandbox::attach_with(&opts.id, vm, opts.boot_timeout, Some(opts)).await?;
        sandbox.boot_time = started.elapsed();
        Ok(sandbox)
    }

    /// Connects to the agent of an already running VM (just booted, or adopted after a
    /// daemon restart) and sends it fresh boot facts. On failure the VM is destroyed.
    pub async fn attach(
        id: &str,
        vm: Box<dyn Vm>,
        timeout: Duration,
    ) -> Result<Sandbox, SandboxError> {
        Sandbox::attach_with(id, vm, timeout, None).await
    }

    /// [`Sandbox::attach`], configuring a new guest (`first`: its network and identity) at the
    /// same time as the boot facts.
    async fn attach_with(
        id: &str,
        vm: Box<dyn Vm>,
        timeout: Duration,
        first: Option<&BootOptions>,
    ) -> Result<Sandbox, SandboxError> {
        let started = Instant::now();
        match connect(vm.as_ref(), id, timeout, first).await {
            Ok(channel) => Ok(Sandbox {
                id: id.to_string(),
                vm,
                channel: Arc::new(channel),
                boot_time: started.elapsed(),
            }),
            Err(e) => {
                let _ = vm.destroy().await;
                Err(e)
            }
        }
    }

    /// The sandbox id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The channel to the guest agent.
    pub fn channel(&self) -> &Arc<Channel> {
        &self.channel
    }

    /// The underlying VM.
    pub fn vm(&self) -> &dyn Vm {
        self.vm.as_ref()
    }

    /// From VMM start to a ready agent.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// Gives the guest the host's clock and fresh entropy again (e.g. when a clone that waited
    /// in a pool is handed out).
    pub async fn refresh(&self) -> Result<(), ChannelError> {
        self.channel.setup(boot_facts(&self.id)).await
    }

    /// Destroys the VM at once, without asking the agent to power off first (for a paused or
    /// already saved VM).
    pub async fn discard(self) -> Result<(), SandboxError> {
        drop(self.channel);
        self.vm.destroy().await.map_err(SandboxError::Destroy)
    }

    /// Asks the agent to power off (bounded), then destroys the VM and everything it owns.
    pub async fn destroy(self) -> Result<(), SandboxError> {
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.channel.shutdown()).await;
        drop(self.channel);
        self.vm.destroy().await.map_err(SandboxError::Destroy)
    }
}

/// The kernel file `vmm` boots for `image`: the ELF `vmlinux` for a backend that needs one
/// (an image built before vmlinux artifacts existed finds it in the cache, if extracted), else
/// the bzImage.
pub fn kernel_for(vmm: &dyn Vmm, image: &hutch_image::Image) -> PathBuf {
    if !vmm.needs_elf_kernel() {
        return image.kernel.clone();
    }
    image
        .vmlinux
        .clone()
        .or_else(|| hutch_image::cached_vmlinux(&image.kernel))
        .unwrap_or_else(|| image.kernel.clone())
}

/// The VM for a sandbox.
fn vm_spec(vmm: &dyn Vmm, opts: &BootOptions) -> VmSpec {
    VmSpec {
        shares: opts.shares.iter().map(|s| s.share.clone()).collect(),
        id: opts.id.clone(),
        kernel: kernel_for(vmm, &opts.image),
        initrd: opts.image.initrd.clone(),
        rootfs: opts.image.rootfs.clone(),
        cpus: opts.cpus,
        memory_mib: opts.memory_mib,
        scratch_disk_mib: opts.disk_mib,
        run_dir: opts.runs_dir.join(&opts.id),
        extra_cmdline: vec![],
        lifetime: if opts.detached {
            Lifetime::Detached
        } else {
            Lifetime::Owned
        },
        memory: opts.memory.clone(),
    }
}

/// Mounts each share at its guest directory (`mount -t virtiofs`, read-only in the guest for
/// a read-only share: the host's virtiofsd enforces it whatever the guest does).
async fn mount_shares(channel: &Channel, shares: &[BootShare]) -> Result<(), SandboxError> {
    for s in shares {
        let opts = if s.share.writable { "rw" } else { "ro" };
        let argv = [
            "sh",
            "-c",
            r#"mkdir -p -- "$3" && mount -t virtiofs -o "$2" -- "$1" "$3""#,
            "mount-share",
            &s.share.tag,
            opts,
            &s.guest_dir,
        ];
        let req = hutch_protocol::ExecRequest {
            timeout_ms: Some(30_000),
            ..hutch_protocol::ExecRequest::new(argv.map(String::from).to_vec())
        };
        let failed = |detail: String| SandboxError::Mount {
            guest_dir: s.guest_dir.clone(),
            detail,
        };
        let out = crate::exec::run_capped(channel, req, None, 2048, OverCap::Drop, None)
            .await
            .map_err(|e| failed(crate::chain(&e.into_channel())))?;
        if out.status != hutch_protocol::ExitStatus::Code(0) {
            let said: String = String::from_utf8_lossy(&out.stderr)
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .take(300)
                .collect();
            return Err(failed(format!("{:?}: {said}", out.status)));
        }
    }
    Ok(())
}

/// Connects, handshakes and sends the boot facts, failing fast if the VM dies meanwhile.
async fn connect(
    vm: &dyn Vm,
    id: &str,
    timeout: Duration,
    first: Option<&BootOptions>,
) -> Result<Channel, SandboxError> {
    let handshake = async {
        let stream = vm.connect_channel().await.map_err(SandboxError::Start)?;
        let channel = Channel::connect(stream)
            .await
            .map_err(SandboxError::Channel)?;
        // Concurrent: each is a round trip to a guest that may be slow (TCG).
        let configure = async {
            match first {
                Some(opts) => configure(&channel, opts).await,
                None => Ok(()),
            }
        };
        tokio::try_join!(channel.setup(boot_facts(id)), configure)
            .map_err(SandboxError::Channel)?;
        Ok(channel)
    };
    let died = async {
        while !vm.has_exited() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        r = tokio::time::timeout(timeout, handshake) => match r {
            Ok(Ok(channel)) => Ok(channel),
            Ok(Err(e)) if vm.has_exited() => {
                tracing::debug!(error = %e, "channel failed because the VM exited");
                Err(SandboxError::DiedDuringBoot { console: console_tail(vm) })
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SandboxError::BootTimeout { timeout, console: console_tail(vm) }),
        },
        () = died => Err(SandboxError::DiedDuringBoot { console: console_tail(vm) }),
    }
}

/// Entropy, wall clock and hostname for a guest, taken at the last moment.
fn boot_facts(id: &str) -> Setup {
    let mut entropy = vec![0u8; SEED_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut entropy);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    Setup {
        entropy,
        unix_secs: now.as_secs(),
        unix_nanos: now.subsec_nanos(),
        hostname: id.to_string(),
    }
}

/// A new guest's network configuration and identity, concurrently.
async fn configure(channel: &Channel, opts: &BootOptions) -> Result<(), ChannelError> {
    let network = async {
        match &opts.network {
            Some((_, config)) => channel.network(config.clone()).await,
            None => Ok(()),
        }
    };
    tokio::try_join!(network, personalize(channel, &opts.id)).map(drop)
}

/// Gives the guest its own machine-id and sandbox id: a restored clone would otherwise keep
/// its template's, and every booted sandbox the image's.
async fn personalize(channel: &Channel, id: &str) -> Result<(), ChannelError> {
    let mut machine_id = [0u8; 16];
    while machine_id == [0; 16] {
        rand::rngs::OsRng.fill_bytes(&mut machine_id);
    }
    channel
        .identity(GuestIdentity {
            machine_id,
            sandbox_id: id.to_string(),
        })
        .await
}

/// The end of the guest console, made printable (it is guest-controlled text).
fn console_tail(vm: &dyn Vm) -> String {
    let bytes = std::fs::read(vm.console_log()).unwrap_or_default();
    let tail = &bytes[bytes.len().saturating_sub(CONSOLE_TAIL)..];
    String::from_utf8_lossy(tail)
        .chars()
        .map(|c| if c.is_control() && c != '\n' { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}
