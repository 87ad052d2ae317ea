//! PID 1 boot: mounts, kernel modules, overlay root, loopback, then the channel: the
//! virtio-serial port `hutch.0` (QEMU) and/or a vsock listener (Firecracker).
//!
//! Initramfs layout (written by `hutch-image`): `/etc/hutch/modules` lists module files in load
//! order; the root disk is the ext4 filesystem labelled `hutch-root`; an optional writable disk
//! labelled `hutch-scratch` holds the overlay's upper layer (tmpfs otherwise).

use std::{
    ffi::CString,
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::{
    mount::{mount, MsFlags},
    unistd::{chdir, chroot},
};

/// Label of the read-only root filesystem.
const ROOT_LABEL: &str = "hutch-root";
/// Label of the per-VM writable disk.
const SCRATCH_LABEL: &str = "hutch-scratch";
/// Name of the virtio-serial port that carries the channel.
const PORT_NAME: &str = "hutch.0";
/// How long to wait for disks and the channel device to appear after modules load.
const DEVICE_WAIT: Duration = Duration::from_secs(10);

/// A failed boot step.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A mount failed.
    #[error("mount {target} failed")]
    Mount {
        /// Where we tried to mount.
        target: String,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// A kernel module failed to load.
    #[error("loading module {module} failed")]
    Module {
        /// Module file.
        module: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A device never appeared.
    #[error("{0} did not appear within {DEVICE_WAIT:?}")]
    Missing(&'static str),
    /// Switching into the new root failed.
    #[error("switching root failed")]
    SwitchRoot(#[source] nix::Error),
    /// Another I/O step failed.
    #[error("{what} failed")]
    Io {
        /// Which step.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What the boot found out.
pub struct Boot {
    /// Device path of the virtio-serial channel port, if the VM has one.
    pub port: Option<String>,
    /// The vsock listener on [`hutch_protocol::VSOCK_PORT`], if the guest has vsock.
    pub vsock: Option<OwnedFd>,
    /// Whether the host only asked whether the kernel boots (accelerator probe).
    pub probe: bool,
}

/// Brings the guest from the initramfs to a running overlay root.
pub fn boot() -> Result<Boot, BootError> {
    let started = Instant::now();
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        "mode=0755",
    )?;
    mount_fs("proc", "/proc", "proc", nosuid_noexec(), "")?;
    mount_fs("sysfs", "/sys", "sysfs", nosuid_noexec(), "")?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline.split_whitespace().any(|a| a == "hutch.probe=1") {
        return Ok(Boot {
            port: None,
            vsock: None,
            probe: true,
        });
    }
    load_modules()?;
    mount_root()?;
    switch_root()?;
    mount_runtime_dirs()?;
    install_identity_cli();
    loopback_up().map_err(|source| BootError::Io {
        what: "bringing up lo",
        source,
    })?;
    // The listener needs only the vsock core (loaded with the modules), not the device.
    let vsock = match crate::vsock::listen(hutch_protocol::VSOCK_PORT) {
        Ok(fd) => Some(fd),
        Err(e) => {
            tracing::debug!(error = %e, "no vsock listener");
            None
        }
    };
    // Whichever channel device the VMM gave us: the port, or a vsock transport with a CID.
    let port = wait_for(
        || match find_port(PORT_NAME) {
            Some(p) => Some(Some(p)),
            None => (vsock.is_some() && crate::vsock::local_cid().is_some()).then_some(None),
        },
        "channel (port hutch.0 or a vsock device)",
    )?;
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        port = port.as_deref().unwrap_or("-"),
        vsock_cid = crate::vsock::local_cid(),
        "hutch-agent ready"
    );
    Ok(Boot {
        port,
        vsock,
        probe: false,
    })
}

fn nosuid_noexec() -> MsFlags {
    MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV
}

fn mount_fs(
    src: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: &str,
) -> Result<(), BootError> {
    let _ = std::fs::create_dir_all(target);
    let data = (!data.is_empty()).then_some(data);
    mount(Some(src), target, Some(fstype), flags, data).map_err(|source| BootError::Mount {
        target: target.to_string(),
        source,
    })
}

fn load_modules() -> Result<(), BootError> {
    let list = std::fs::read_to_string("/etc/hutch/modules").unwrap_or_default();
    for module in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let err = |source| BootError::Module {
            module: module.to_string(),
            source,
        };
        let file = std::fs::File::open(module).map_err(err)?;
        let params = CString::default();
        // SAFETY: finit_module with a valid fd and an empty, NUL-terminated parameter string.
        let rc =
            unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(err(e));
            }
        }
    }
    Ok(())
}

/// Mounts the labelled root read-only and an overlay with a writable upper layer on /newroot.
fn mount_root() -> Result<(), BootError> {
    let root = wait_for(|| find_disk(ROOT_LABEL), "root disk (label hutch-root)")?;
    mount_fs(&root, "/mnt/ro", "ext4", MsFlags::MS_RDONLY, "")?;
    match find_disk(SCRATCH_LABEL) {
        Some(scratch) => mount_fs(&scratch, "/mnt/rw", "ext4", MsFlags::MS_NOATIME, "")?,
        None => mount_fs("tmpfs", "/mnt/rw", "tmpfs", MsFlags::empty(), "mode=0755")?,
    }
    for d in ["/mnt/rw/upper", "/mnt/rw/work"] {
        std::fs::create_dir_all(d).map_err(|source| BootError::Io {
            what: "creating overlay dirs",
            source,
        })?;
    }
    mount_fs(
        "overlay",
        "/newroot",
        "overlay",
        MsFlags::empty(),
        "lowerdir=/mnt/ro,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work",
    )
}

/// Moves the API filesystems into /newroot and makes it `/`.
fn switch_root() -> Result<(), BootError> {
    for m in ["/dev", "/proc", "/sys"] {
        let target = format!("/newroot{m}");
        let _ = std::fs::create_dir_all(&target);
        mount(
            Some(m),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(|source| BootError::Mount { target, source })?;
    }
    chdir("/newroot").map_err(BootError::SwitchRoot)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(BootError::SwitchRoot)?;
    chroot(".").map_err(BootError::SwitchRoot)?;
    chdir("/").map_err(BootError::SwitchRoot)
}

fn mount_runtime_dirs() -> Result<(), BootError> {
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        nosuid_noexec() - MsFlags::MS_NODEV,
        "newinstance,ptmxmode=0666,mode=0620",
    )?;
    for (target, mode) in [
        ("/dev/shm", "mode=1777"),
        ("/tmp", "mode=1777"),
        ("/run", "mode=0755"),
    ] {
        mount_fs(
            "tmpfs",
            target,
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            mode,
        )?;
    }
    Ok(())
}

/// Bind-mounts this binary (still the initramfs's `/init`, reachable as `/proc/self/exe`) at
/// [`crate::identity::CLI_PATH`], read-only, so guest processes find `hutch-identity` on their
/// `PATH` without a copy in memory or on disk. A failure costs only the client, not the boot.
fn install_identity_cli() {
    let target = crate::identity::CLI_PATH;
    let made = std::path::Path::new(target)
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(target)
                .map(drop)
        });
    let bound = made
        .map_err(|e| nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
        .and_then(|()| {
            mount(
                Some("/proc/self/exe"),
                target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )?;
            mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
        });
    if let Err(e) = bound {
        tracing::warn!(error = %e, path = target, "no hutch-identity client in the guest");
    }
}

/// Polls `find` until it yields, for at most [`DEVICE_WAIT`].
#[allow(clippy::disallowed_methods)] // Boot, before the async server starts.
fn wait_for<T>(find: impl Fn() -> Option<T>, what: &'static str) -> Result<T, BootError> {
    let deadline = Instant::now() + DEVICE_WAIT;
    loop {
        if let Some(v) = find() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(BootError::Missing(what));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The `/dev/vd*` whose ext4 superblock carries `label`.
fn find_disk(label: &str) -> Option<String> {
    let entries = std::fs::read_dir("/sys/block").ok()?;
    entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vd"))
        .map(|n| format!("/dev/{n}"))
        .find(|dev| ext4_label(Path::new(dev)).as_deref() == Some(label))
}

/// Reads the volume label of an ext2/3/4 filesystem, if `dev` holds one.
fn ext4_label(dev: &Path) -> Option<String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(dev).ok()?;
    let mut sb = [0u8; 0x88];
    f.read_exact_at(&mut sb, 1024).ok()?;
    if u16::from_le_bytes([sb[0x38], sb[0x39]]) != 0xEF53 {
        return None;
    }
    let name = &sb[0x78..0x88];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Some(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// The `/dev/vportNpM` device whose port name is `name`.
fn find_port(name: &str) -> Option<String> {
    let entries = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    entries.flatten().find_map(|e| {
        let port_name = std::fs::read_to_string(e.path().join("name")).ok()?;
        let dev = PathBuf::from("/dev").join(e.file_name());
        (port_name.trim() == name && dev.exists()).then(|| dev.to_string_lossy().into_owned())
    })
}

/// Sets `IFF_UP` on the loopback interface.
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket + SIOC[GS]IFFLAGS ioctls on a zeroed ifreq naming "lo".
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        let mut rc = libc::ioctl(sock, libc::SIOCGIFFLAGS as libc::Ioctl, &mut req);
        if rc == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            rc = libc::ioctl(sock, libc::SIOCSIFFLAGS as libc::Ioctl, &req);
        }
        let err = std::io::Error::last_os_error();
        libc::close(sock);
        if rc < 0 {
            return Err(err);
        }
    }
    Ok(())
}

/// Answers the host's accelerator probe on the console, then powers off.
pub fn probe_and_power_off() -> ! {
    println!("hutch-probe-ok");
    power_off()
}

/// Boot failed: say why on the console and power off, so the host sees it at once
/// instead of waiting for a timeout. (PID 1 must not exit: that would panic the kernel.)
pub fn fatal(e: &BootError) -> ! {
    let mut msg = format!("hutch-agent: boot failed: {e}");
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    eprintln!("{msg}");
    power_off()
}

/// Syncs and powers the VM off.
#[allow(clippy::disallowed_methods)] // Nothing else runs any more: PID 1 only waits.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}
