//! `FirecrackerVmm`: start-up refusals and clean-up without a firecracker binary, and the real
//! thing when one is found (`FIRECRACKER_BIN` or `PATH`; `JAILER_BIN` or `PATH` for the jailer).
//! Without what they need, real-binary tests print a `SKIP <test>: <why>` line and return; with
//! `HUTCH_REQUIRE_FIRECRACKER=1` they fail instead. They never pass silently. (This is not
//! `HUTCH_REQUIRE_VM_TESTS`: CI requires QEMU VMs, but no registry ships Firecracker, so CI
//! hosts have no binary unless one is provided.)

// Tests wait on processes and threads synchronously, on threads of their own.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use hutch_vmm::firecracker::api::{
    InstanceState, MachineConfig, NetworkInterface, NetworkOverride, SnapshotCreateParams,
    SnapshotType,
};
use hutch_vmm::firecracker::{
    find_firecracker, find_jailer, FirecrackerClient, FirecrackerError, JailerConfig,
    LaunchOptions, RestoreOptions, SnapshotFiles,
};
use hutch_vmm::{FirecrackerVmm, Lifetime, Vm, VmSpec, Vmm, VmmError};

fn skip(test: &str, why: &str) {
    if std::env::var("HUTCH_REQUIRE_FIRECRACKER").as_deref() == Ok("1") {
        panic!("{test}: {why} (HUTCH_REQUIRE_FIRECRACKER=1, so this is a failure)");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
}

fn firecracker_or_skip(test: &str) -> Option<PathBuf> {
    match find_firecracker() {
        Ok(p) => Some(p),
        Err(_) => {
            skip(test, "no firecracker binary (set FIRECRACKER_BIN)");
            None
        }
    }
}

fn spec(kernel: &Path, initrd: &Path, rootfs: &Path, run_dir: &Path) -> VmSpec {
    VmSpec {
        shares: Vec::new(),
        id: "fc-test".into(),
        kernel: kernel.into(),
        initrd: initrd.into(),
        rootfs: rootfs.into(),
        cpus: 1,
        memory_mib: 128,
        scratch_disk_mib: 0,
        run_dir: run_dir.into(),
        extra_cmdline: vec![],
        lifetime: Lifetime::Owned,
        memory: hutch_vmm::GuestMemory::Anonymous,
    }
}

/// A file that passes the up-front ELF check (Firecracker itself would still refuse it).
fn fake_elf(dir: &Path) -> PathBuf {
    let p = dir.join("vmlinux");
    let mut b = vec![0u8; 64];
    b[..4].copy_from_slice(b"\x7fELF");
    std::fs::write(&p, b).unwrap();
    p
}

#[tokio::test]
async fn bzimage_is_refused_before_anything_exists() {
    let d = tempfile::tempdir().unwrap();
    let bz = d.path().join("vmlinuz");
    std::fs::write(&bz, b"MZ\0\0\0\0HdrS").unwrap();
    let run = d.path().join("vm");
    let vmm = FirecrackerVmm::with_binary("/nonexistent/firecracker");
    let e = vmm.start(&spec(&bz, &bz, &bz, &run)).await.unwrap_err();
    assert!(
        matches!(e, VmmError::Firecracker(FirecrackerError::KernelNotElf(_))),
        "{e:?}"
    );
    assert!(!run.exists());
}

#[tokio::test]
async fn missing_binary_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let k = fake_elf(d.path());
    let run = d.path().join("vm");
    let vmm = FirecrackerVmm::with_binary(d.path().join("no-firecracker"));
    let e = vmm.start(&spec(&k, &k, &k, &run)).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "firecracker binary not found: set FIRECRACKER_BIN or put it on PATH"
    );
    assert!(!run.exists());
}

#[tokio::test]
async fn a_vmm_that_exits_at_once_is_reported_and_cleaned() {
    let d = tempfile::tempdir().unwrap();
    let k = fake_elf(d.path());
    let run = d.path().join("vm");
    let vmm = FirecrackerVmm::with_binary("/bin/false");
    let e = vmm.start(&spec(&k, &k, &k, &run)).await.unwrap_err();
    assert!(
        matches!(e, VmmError::Firecracker(FirecrackerError::Exited { .. })),
        "{e:?}"
    );
    assert!(!run.exists(), "run dir removed");
}

#[tokio::test]
async fn adopt_without_a_record_is_gone() {
    let d = tempfile::tempdir().unwrap();
    let vmm = FirecrackerVmm::with_binary("/nonexistent/firecracker");
    let e = vmm.adopt("fc-test", d.path()).await.unwrap_err();
    assert!(
        matches!(e, VmmError::Gone { ref why, .. } if why == "no identity.json"),
        "{e:?}"
    );
}

/// Runs the real binary's API (no guest, no KVM needed): version, state, and a refused bzImage
/// whose `fault_message` reaches our error.
#[tokio::test]
async fn real_api_answers_and_faults() {
    let test = "real_api_answers_and_faults";
    let Some(fc) = firecracker_or_skip(test) else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("api.sock");
    let mut child = tokio::process::Command::new(&fc)
        .arg("--api-sock")
        .arg(&sock)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let c = FirecrackerClient::new(&sock);
    let mut ready = false;
    for _ in 0..500 {
        if c.describe_instance().await.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ready, "API never answered");
    let v = c.version().await.unwrap();
    assert!(!v.firecracker_version.is_empty());
    assert_eq!(
        c.describe_instance().await.unwrap().state,
        InstanceState::NotStarted
    );
    c.put_machine_config(&MachineConfig::new(1, 128))
        .await
        .unwrap();
    let bz = d.path().join("vmlinuz");
    std::fs::write(&bz, vec![0x4d; 4096]).unwrap();
    let e = c
        .put_boot_source(&hutch_vmm::firecracker::api::BootSource {
            kernel_image_path: bz,
            boot_args: None,
            initrd_path: None,
        })
        .await;
    // v1.16 checks the kernel at InstanceStart or at boot-source time depending on version:
    // whichever refuses it must carry a fault message.
    let e = match e {
        Err(e) => e,
        Ok(()) => c.instance_start().await.unwrap_err(),
    };
    let fault = e.fault_message().expect("an API fault");
    assert!(!fault.is_empty(), "{e:?}");
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// The default image of `$HUTCH_HOME` (default `/var/lib/hutch`) as (bzImage, initrd, rootfs),
/// or a skip. The bzImage, as every image user holds it: the backend must find the image's
/// `vmlinux` itself. An image built before vmlinux extraction gets one extracted into `dir`.
fn image_or_skip(test: &str, dir: &Path) -> Option<(PathBuf, PathBuf, PathBuf)> {
    let home =
        std::env::var_os("HUTCH_HOME").map_or_else(|| "/var/lib/hutch".into(), PathBuf::from);
    let image = match hutch_image::open(&home.join("images"), "default") {
        Ok(i) => i,
        Err(e) => {
            skip(
                test,
                &format!("no default image in {}: {e}", home.display()),
            );
            return None;
        }
    };
    let kernel = match image.vmlinux {
        Some(vmlinux) => vmlinux,
        None => {
            let vmlinux = dir.join("vmlinux");
            if let Err(e) = hutch_image::vmlinux::extract_vmlinux(&image.kernel, &vmlinux) {
                skip(test, &format!("cannot extract vmlinux: {e}"));
                return None;
            }
            vmlinux
        }
    };
    Some((kernel, image.initrd, image.rootfs))
}

fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            skip(test, &format!("/dev/kvm not usable: {e}"));
            false
        }
    }
}

/// start → pause → full snapshot → resume → destroy, on the real binary and KVM. The guest need
/// not boot all the way (on nested PVM hosts it cannot): this checks the VMM side.
#[tokio::test]
async fn real_start_pause_snapshot_destroy() {
    let test = "real_start_pause_snapshot_destroy";
    let Some(fc) = firecracker_or_skip(test) else {
        return;
    };
    if !kvm_or_skip(test) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let Some((k, i, r)) = image_or_skip(test, d.path()) else {
        return;
    };
    let run = d.path().join("vm");
    let mut s = spec(&k, &i, &r, &run);
    s.scratch_disk_mib = 64;
    let vmm = FirecrackerVmm::with_binary(fc);
    let vm = vmm.start_with(&s, &Default::default()).await.unwrap();
    assert!(run.join("api.sock").exists() && run.join("identity.json").exists());
    if vm.has_exited() {
        skip(test, "the guest stopped the VMM at once (nested PVM KVM?)");
        return;
    }
    assert!(!vm.is_paused().await.unwrap());
    vm.pause().await.unwrap();
    assert!(vm.is_paused().await.unwrap());
    let snap = d.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    vm.client()
        .create_snapshot(&SnapshotCreateParams {
            mem_file_path: snap.join("mem"),
            snapshot_path: snap.join("state"),
            snapshot_type: Some(SnapshotType::Full),
        })
        .await
        .unwrap();
    assert_eq!(
        std::fs::metadata(snap.join("mem")).unwrap().len(),
        128 << 20
    );
    vm.resume().await.unwrap();
    let pid = vm.pid();
    Box::new(vm).destroy().await.unwrap();
    assert!(!run.exists(), "run dir removed");
    // Our child, so destroy reaped it: the pid is gone (or already someone else's).
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(!String::from_utf8_lossy(&cmdline).contains("fc-test"));
}

/// A jailed launch: chroot, pid file, API through the symlink, then destroy removes the jail.
#[tokio::test]
async fn real_jailer_launch_and_cleanup() {
    let test = "real_jailer_launch_and_cleanup";
    let Some(fc) = firecracker_or_skip(test) else {
        return;
    };
    let Ok(jailer) = find_jailer() else {
        skip(test, "no jailer binary (set JAILER_BIN)");
        return;
    };
    if !nix_is_root() {
        skip(test, "the jailer needs root");
        return;
    }
    if !kvm_or_skip(test) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let Some((k, i, r)) = image_or_skip(test, d.path()) else {
        return;
    };
    let mut j = JailerConfig::new(jailer, 12_345, 12_345);
    j.chroot_base = d.path().join("jail");
    let vmm = FirecrackerVmm::with_binary(&fc).with_jailer(j.clone());
    let run = d.path().join("vm");
    let vm = vmm
        .start_with(&spec(&k, &i, &r, &run), &Default::default())
        .await;
    let vm = match vm {
        Ok(vm) => vm,
        Err(e) => panic!("jailed start failed: {}", chain(&e)),
    };
    let jail = j.jail_dir(&fc, "fc-test");
    assert!(jail.join("root/api.sock").exists());
    assert_eq!(vm.jail_dir(), Some(jail.as_path()));
    assert!(vm.client().describe_instance().await.is_ok());
    Box::new(vm).destroy().await.unwrap();
    assert!(!jail.exists(), "jail removed");
    assert!(!run.exists(), "run dir removed");
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Snapshots as VM operations on the real binary: start → pause → full snapshot → diff snapshot
/// → destroy; then two VMs restored from the full snapshot at once, each with its own run dir
/// and vsock socket, paused until resumed. The guest need not boot (on nested PVM hosts it
/// cannot): this checks the VMM side.
#[tokio::test]
async fn real_snapshot_create_and_restore_two_at_once() {
    let test = "real_snapshot_create_and_restore_two_at_once";
    let Some(fc) = firecracker_or_skip(test) else {
        return;
    };
    if !kvm_or_skip(test) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let Some((k, i, r)) = image_or_skip(test, d.path()) else {
        return;
    };
    let vmm = FirecrackerVmm::with_binary(fc);
    let opts = LaunchOptions {
        track_dirty_pages: true,
        ..Default::default()
    };
    let vm = vmm
        .start_with(&spec(&k, &i, &r, &d.path().join("vm")), &opts)
        .await
        .unwrap();
    if vm.has_exited() {
        skip(test, "the guest stopped the VMM at once (nested PVM KVM?)");
        return;
    }
    let full = SnapshotFiles::in_dir(&d.path().join("full"));
    let diff = SnapshotFiles::in_dir(&d.path().join("diff"));
    std::fs::create_dir(d.path().join("full")).unwrap();
    std::fs::create_dir(d.path().join("diff")).unwrap();
    let e = vm
        .snapshot_create(SnapshotType::Full, &full)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("pause"),
        "a running VM is refused: {e}"
    );
    vm.pause().await.unwrap();
    vm.snapshot_create(SnapshotType::Full, &full).await.unwrap();
    assert_eq!(std::fs::metadata(&full.memory).unwrap().len(), 128 << 20);
    assert!(std::fs::metadata(&full.state).unwrap().len() > 0);
    vm.resume().await.unwrap();
    vm.pause().await.unwrap();
    vm.snapshot_create(SnapshotType::Diff, &diff).await.unwrap();
    assert!(diff.state.is_file() && diff.memory.is_file());
    // Sparse: the diff holds only pages written since the full snapshot.
    use std::os::unix::fs::MetadataExt;
    let diff_meta = std::fs::metadata(&diff.memory).unwrap();
    assert!(
        diff_meta.blocks() * 512 < diff_meta.len(),
        "the diff is not sparse"
    );
    // Taken files are never overwritten.
    assert!(vm.snapshot_create(SnapshotType::Full, &full).await.is_err());
    Box::new(vm).destroy().await.unwrap();

    let restore = |name: &str| {
        let mut s = spec(&k, &i, &r, &d.path().join(name));
        s.id = name.into();
        s
    };
    // The original's run dir (and vsock socket) is gone: each load needs its vsock override.
    let (a, b) = (restore("clone-a"), restore("clone-b"));
    let ropts = RestoreOptions::default();
    let (va, vb) = tokio::join!(
        vmm.restore_snapshot(&a, &ropts, &full),
        vmm.restore_snapshot(&b, &ropts, &full)
    );
    let (va, vb) = match (va, vb) {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => panic!(
            "restore failed: {:?} / {:?}",
            a.err().map(|e| chain(&e)),
            b.err().map(|e| chain(&e))
        ),
    };
    assert_ne!(va.pid(), vb.pid());
    assert_ne!(va.vsock_path(), vb.vsock_path());
    for vm in [&va, &vb] {
        assert!(vm.is_paused().await.unwrap(), "restored paused");
        assert!(
            vm.vsock_path().exists(),
            "vsock socket at the VM's own path"
        );
        assert_eq!(
            vm.client().describe_instance().await.unwrap().state,
            InstanceState::Paused
        );
    }
    va.resume().await.unwrap();
    assert!(!va.is_paused().await.unwrap());
    for vm in [va, vb] {
        let run = vm.run_dir().to_path_buf();
        Box::new(vm).destroy().await.unwrap();
        assert!(!run.exists(), "run dir removed");
    }
}

/// Firecracker cannot map guest RAM from a caller's file: refused before anything exists.
#[tokio::test]
async fn shared_memory_files_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let k = fake_elf(d.path());
    let run = d.path().join("vm");
    let mut s = spec(&k, &k, &k, &run);
    s.memory = hutch_vmm::GuestMemory::SharedFile(d.path().join("ram"));
    let vmm = FirecrackerVmm::with_binary("/nonexistent/firecracker");
    let e = vmm.start(&s).await.unwrap_err();
    assert!(
        matches!(e, VmmError::InvalidSpec(ref m) if m.contains("anonymous memory")),
        "{e:?}"
    );
    assert!(!run.exists());
}

/// The trait's snapshot and restore on the real binary: `Vm::snapshot` writes the shared record
/// (RAM in `memory`, the writable disk frozen as `disk`), and two `Vmm::restore`s at once each
/// get their own copy of that disk under the same drive path (`/proc/self/fd/10`), paused. The
/// guest need not boot: the disk's content is checked from the host.
#[tokio::test]
async fn real_trait_snapshot_and_restore_give_each_clone_its_own_disk() {
    let test = "real_trait_snapshot_and_restore_give_each_clone_its_own_disk";
    let Some(fc) = firecracker_or_skip(test) else {
        return;
    };
    if !kvm_or_skip(test) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let Some((k, i, r)) = image_or_skip(test, d.path()) else {
        return;
    };
    let vmm = FirecrackerVmm::with_binary(fc);
    let mut s = spec(&k, &i, &r, &d.path().join("vm"));
    s.scratch_disk_mib = 16;
    let vm = vmm.start(&s).await.unwrap();
    if vm.has_exited() {
        skip(test, "the guest stopped the VMM at once (nested PVM KVM?)");
        return;
    }
    // A marker in the disk's last block, written from the host.
    let marker = b"hutch-disk-marker";
    let end = (16u64 << 20) - 4096;
    let put = |path: &Path, bytes: &[u8]| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(bytes, end).unwrap();
    };
    let get = |path: &Path| {
        use std::os::unix::fs::FileExt;
        let mut b = vec![0u8; marker.len()];
        std::fs::File::open(path)
            .unwrap()
            .read_exact_at(&mut b, end)
            .unwrap();
        b
    };
    put(&d.path().join("vm/scratch.ext4"), marker);
    let dir = d.path().join("snap");
    let e = vm.snapshot(&dir).await.unwrap_err();
    assert!(e.to_string().contains("paused"), "{e}");
    assert!(!dir.exists(), "a refused snapshot leaves no dir");
    vm.pause().await.unwrap();
    let snap = vm.snapshot(&dir).await.unwrap();
    assert_eq!(snap.backend, "firecracker");
    assert_eq!(
        snap.memory,
        hutch_vmm::SnapshotMemory::File(dir.join("memory"))
    );
    assert_eq!(snap.disk_format.as_deref(), Some("raw"));
    assert_eq!(hutch_vmm::Snapshot::load(&dir).unwrap(), snap);
    assert_eq!(
        std::fs::metadata(dir.join("memory")).unwrap().len(),
        128 << 20
    );
    assert_eq!(get(&snap.disk_file()), marker);
    Box::new(vm).destroy().await.unwrap();

    let restore = |name: &str| {
        let mut s = spec(&k, &i, &r, &d.path().join(name));
        s.id = name.into();
        s
    };
    let (a, b) = (restore("clone-a"), restore("clone-b"));
    let (va, vb) = tokio::join!(vmm.restore(&a, None, &snap), vmm.restore(&b, None, &snap));
    let (va, vb) = match (va, vb) {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => panic!(
            "restore failed: {:?} / {:?}",
            a.err().map(|e| chain(&e)),
            b.err().map(|e| chain(&e))
        ),
    };
    for vm in [&va, &vb] {
        assert!(vm.is_paused().await.unwrap(), "restored paused");
        let own = vm.run_dir().join("scratch.ext4");
        let fd = std::fs::read_link(format!("/proc/{}/fd/10", vm.pid())).unwrap();
        assert_eq!(fd, own, "the drive is the clone's own copy");
        assert_eq!(get(&own), marker, "the copy is the disk as it was");
    }
    // One clone's writes reach neither the other clone nor the snapshot.
    put(&va.run_dir().join("scratch.ext4"), b"clone-a-wrote-this");
    assert_eq!(get(&vb.run_dir().join("scratch.ext4")), marker);
    assert_eq!(get(&snap.disk_file()), marker);
    // A restore must match the snapshot's shape.
    let mut wrong = restore("clone-c");
    wrong.memory_mib = 256;
    let e = vmm.restore(&wrong, None, &snap).await.unwrap_err();
    assert!(e.to_string().contains("128 MiB"), "{e}");
    assert!(!wrong.run_dir.exists());
    va.resume().await.unwrap();
    for vm in [va, vb] {
        let run = vm.run_dir().to_path_buf();
        vm.destroy().await.unwrap();
        assert!(!run.exists(), "run dir removed");
    }
}

/// Runs `ip args…`, panicking with its stderr on failure.
fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace holding one TAP, deleted (with the TAP) on drop.
struct NsTap {
    ns: String,
}

impl NsTap {
    fn new(ns: String, tap: &str) -> NsTap {
        ip(&["netns", "add", &ns]);
        let me = NsTap { ns };
        ip(&[
            "-n", &me.ns, "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr",
        ]);
        me
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.ns)
    }
}

impl Drop for NsTap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .status();
    }
}

/// The TAP names `pid` holds open (`iff:` in the fdinfo of its tun descriptors).
fn taps_of(pid: u32) -> Vec<String> {
    let mut taps = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
    {
        let info = std::fs::read_to_string(e.path()).unwrap_or_default();
        taps.extend(
            info.lines()
                .filter_map(|l| l.strip_prefix("iff:"))
                .map(|n| n.trim().to_string()),
        );
    }
    taps
}

/// The inode of `pid`'s network namespace, to compare with a namespace file's.
fn netns_inode(pid: u32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .unwrap()
        .ino()
}

/// A NIC on a direct (no jailer) launch: firecracker enters the sandbox's namespace and opens
/// its TAP there by name; a snapshot records the guest MAC; two restores at once, each in its
/// own namespace with its own TAP (`network_overrides`). The trait's `start_with_nic` and
/// `restore` refuse an open TAP descriptor with the reason. The guest need not boot.
#[tokio::test]
async fn real_nic_in_a_namespace_and_clones_with_their_own_taps() {
    let test = "real_nic_in_a_namespace_and_clones_with_their_own_taps";
    let Some(fc) = firecracker_or_skip(test) else {
        return;
    };
    if !nix_is_root() {
        skip(test, "network namespaces and TAPs need root");
        return;
    }
    if !kvm_or_skip(test) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let Some((k, i, r)) = image_or_skip(test, d.path()) else {
        return;
    };
    let tag = std::process::id();
    let nets: Vec<NsTap> = ["a", "b", "c"]
        .iter()
        .map(|n| NsTap::new(format!("hutch-fct-{tag}-{n}"), &format!("fct{n}0")))
        .collect();
    let vmm = FirecrackerVmm::with_binary(fc);
    let mac = "06:00:ac:10:00:02";
    let iface = NetworkInterface {
        iface_id: "eth0".into(),
        host_dev_name: "fcta0".into(),
        guest_mac: Some(mac.into()),
        mtu: None,
        rx_rate_limiter: None,
        tx_rate_limiter: None,
    };
    let opts = LaunchOptions {
        netns: Some(nets[0].path()),
        network_interfaces: vec![iface],
        ..Default::default()
    };
    let vm = vmm
        .start_with(&spec(&k, &i, &r, &d.path().join("vm")), &opts)
        .await
        .unwrap();
    if vm.has_exited() {
        skip(test, "the guest stopped the VMM at once (nested PVM KVM?)");
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let ino = |n: &NsTap| std::fs::metadata(n.path()).unwrap().ino();
    assert_eq!(
        netns_inode(vm.pid()),
        ino(&nets[0]),
        "runs in the namespace"
    );
    assert_eq!(taps_of(vm.pid()), vec!["fcta0".to_string()]);
    vm.pause().await.unwrap();
    let snap = vm.snapshot(&d.path().join("snap")).await.unwrap();
    assert_eq!(snap.nic_mac, Some([6, 0, 0xac, 0x10, 0, 2]));
    Box::new(vm).destroy().await.unwrap();

    let restore = |name: &str| {
        let mut s = spec(&k, &i, &r, &d.path().join(name));
        s.id = name.into();
        s
    };
    let files = SnapshotFiles {
        state: snap.state_file(),
        memory: d.path().join("snap/memory"),
    };
    let ropts = |n: &NsTap, tap: &str| RestoreOptions {
        netns: Some(n.path()),
        network_overrides: vec![NetworkOverride {
            iface_id: "eth0".into(),
            host_dev_name: tap.into(),
        }],
        nic_mac: snap.nic_mac,
        ..Default::default()
    };
    let (ob, oc) = (ropts(&nets[1], "fctb0"), ropts(&nets[2], "fctc0"));
    let (sb, sc) = (restore("clone-b"), restore("clone-c"));
    let (vb, vc) = tokio::join!(
        vmm.restore_snapshot(&sb, &ob, &files),
        vmm.restore_snapshot(&sc, &oc, &files)
    );
    let (vb, vc) = match (vb, vc) {
        (Ok(b), Ok(c)) => (b, c),
        (b, c) => panic!(
            "restore failed: {:?} / {:?}",
            b.err().map(|e| chain(&e)),
            c.err().map(|e| chain(&e))
        ),
    };
    assert_eq!(netns_inode(vb.pid()), ino(&nets[1]));
    assert_eq!(netns_inode(vc.pid()), ino(&nets[2]));
    assert_eq!(taps_of(vb.pid()), vec!["fctb0".to_string()]);
    assert_eq!(taps_of(vc.pid()), vec!["fctc0".to_string()]);
    // The trait's restore must give the snapshot's guest its NIC, and neither restore nor
    // start takes an open TAP descriptor.
    let e = vmm
        .restore(&restore("clone-d"), None, &snap)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("must give it"), "{e}");
    let tap = std::fs::File::open("/dev/null").unwrap();
    let nic = hutch_vmm::Nic {
        tap: hutch_vmm::Tap::Fd(std::sync::Arc::new(tap.into())),
        mac: [6, 0, 0xac, 0x10, 0, 2],
    };
    let e = vmm
        .restore(&restore("clone-d"), Some(&nic), &snap)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("by name"), "{e}");
    let e = vmm
        .start_with_nic(&restore("clone-e"), Some(&nic))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("by name"), "{e}");
    assert!(!d.path().join("clone-e").exists());
    for vm in [vb, vc] {
        Box::new(vm).destroy().await.unwrap();
    }
    drop(nets);
}
