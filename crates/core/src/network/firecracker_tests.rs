//! Core's network path with the real Firecracker backend: [`attach`] hands the sandbox's TAP
//! over by name, firecracker runs in the sandbox's namespace holding the TAP, a snapshot's
//! clones restore at once into namespaces of their own, and nothing is left behind. Run directly
//! and through the jailer (a dynamically linked firecracker gets its libraries in the chroot).
//!
//! The guest need not boot (on nested PVM hosts it cannot): everything checked is the VMM's side.
//! Needs root, `ip`, `nft`, `/dev/kvm`, a firecracker binary (`FIRECRACKER_BIN`, `PATH`; the
//! jailed run also `JAILER_BIN`) and the `default` image with its vmlinux in `$HUTCH_HOME`
//! (default `/var/lib/hutch`). Without them: a `SKIP <test>: <why>` line, or a failure with
//! `HUTCH_REQUIRE_FIRECRACKER=1`.

// Tests inspect the host with short synchronous commands.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::Command;

use hutch_net::testbed::World;
use hutch_net::{Network, OwnedObject};
use hutch_types::NetworkPolicy;
use hutch_vmm::firecracker::{find_firecracker, find_jailer, FirecrackerClient, JailerConfig};
use hutch_vmm::{format_mac, FirecrackerVmm, Lifetime, Tap, Vm, VmSpec, Vmm};

use super::{attach, nic_policy};

fn skip(test: &str, why: &str) {
    if std::env::var("HUTCH_REQUIRE_FIRECRACKER").as_deref() == Ok("1") {
        panic!("{test}: {why} (HUTCH_REQUIRE_FIRECRACKER=1, so this is a failure)");
    }
    eprintln!("SKIP {test}: {why}");
}

/// The image's (vmlinux, initrd, rootfs), the firecracker binary, or why the test cannot run.
fn prerequisites() -> Result<(PathBuf, PathBuf, PathBuf, PathBuf), String> {
    if !rustix::process::geteuid().is_root() {
        return Err("needs root (network namespaces, TAPs, the jailer)".into());
    }
    let fc = find_firecracker().map_err(|e| e.to_string())?;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm not usable: {e}"))?;
    for p in ["ip", "nft"] {
        if !Command::new(p)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Err(format!("{p} not found"));
        }
    }
    let home = std::env::var_os("HUTCH_HOME")
        .map_or_else(|| PathBuf::from("/var/lib/hutch"), PathBuf::from);
    let image = hutch_image::open(&home.join("images"), "default")
        .map_err(|e| format!("no default image in {}: {e}", home.display()))?;
    let vmlinux = image
        .vmlinux
        .ok_or("the default image has no vmlinux (build it again)")?;
    Ok((vmlinux, image.initrd, image.rootfs, fc))
}

fn spec(id: &str, image: &(PathBuf, PathBuf, PathBuf, PathBuf), dir: &Path) -> VmSpec {
    VmSpec {
        shares: Vec::new(),
        id: id.into(),
        kernel: image.0.clone(),
        initrd: image.1.clone(),
        rootfs: image.2.clone(),
        cpus: 1,
        memory_mib: 128,
        scratch_disk_mib: 16,
        run_dir: dir.join(id),
        extra_cmdline: vec![],
        lifetime: Lifetime::Owned,
        memory: Default::default(),
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

/// Whether `pid` is gone or has exited (a zombie: a jailed firecracker is not our child, and
/// whoever inherited it from the jailer reaps it).
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().ino()
}

/// Checks that `vm` runs in `netns` holding the TAP `name` (whose carrier is then up) and that
/// firecracker's configuration names that TAP and `mac`.
async fn assert_attached(vm: &dyn Vm, name: &str, netns: &Path, mac: [u8; 6]) {
    let pid = vm.pid();
    assert_eq!(
        inode(Path::new(&format!("/proc/{pid}/ns/net"))),
        inode(netns),
        "firecracker runs in {}",
        netns.display()
    );
    assert_eq!(
        taps_of(pid),
        vec![name.to_string()],
        "pid {pid} holds the TAP"
    );
    let ns = netns.file_name().unwrap().to_str().unwrap();
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", name])
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&out.stdout);
    assert!(
        link.contains("LOWER_UP") && !link.contains("NO-CARRIER"),
        "{link}"
    );
    let cfg = FirecrackerClient::new(vm.run_dir().join("api.sock"))
        .vm_config()
        .await
        .unwrap();
    let ifaces: Vec<_> = cfg
        .network_interfaces
        .iter()
        .map(|n| (n.host_dev_name.as_str(), n.guest_mac.as_deref()))
        .collect();
    assert_eq!(ifaces, vec![(name, Some(format_mac(&mac).as_str()))]);
}

/// Removes the test's sandbox networks even when an assert failed half-way.
struct Nets(Vec<String>);

impl Drop for Nets {
    fn drop(&mut self) {
        for id in &self.0 {
            let _ = Command::new("ip")
                .args(["netns", "del", &format!("hutch-{id}")])
                .output();
        }
    }
}

async fn tap_by_name_and_clones(test: &str, jailed: bool) {
    let image = match prerequisites() {
        Ok(i) => i,
        Err(why) => return skip(test, &why),
    };
    let dir = tempfile::Builder::new()
        .prefix("hutch-fcn")
        .tempdir()
        .unwrap();
    let mut vmm = FirecrackerVmm::with_binary(&image.3);
    let mut jail_base = None;
    if jailed {
        let Ok(jailer) = find_jailer() else {
            return skip(test, "no jailer binary (set JAILER_BIN)");
        };
        let mut j = JailerConfig::new(jailer, 12_346, 12_346);
        j.chroot_base = dir.path().join("jail");
        jail_base = Some(j.chroot_base.clone());
        vmm = vmm.with_jailer(j);
    }
    assert!(vmm.opens_tap_by_name());
    let tag = format!(
        "{}{}",
        if jailed { "j" } else { "d" },
        std::process::id() % 100_000
    );
    let w = World::new(&format!("fc{tag}"));
    let net = std::sync::Arc::new(Network::new(w.cfg()).await.unwrap());
    let ids: Vec<String> = ["t", "b", "c"]
        .iter()
        .map(|n| format!("fcn{n}{tag}"))
        .collect();
    let _nets = Nets(ids.clone());
    let policy = nic_policy(&NetworkPolicy::None).unwrap();
    let mut pids = Vec::new();

    let host: std::sync::Arc<dyn crate::HostNetwork> = net.clone();
    // The template: core's attach gives the TAP by name; nothing here holds it open.
    let (nic, _) = attach(&host, &vmm, &ids[0], &policy, None)
        .await
        .unwrap()
        .expect("a NIC");
    let Tap::Named { name, netns } = nic.tap.clone() else {
        panic!("firecracker gets its TAP by name, not {:?}", nic.tap);
    };
    let vm = match vmm
        .start_with_nic(&spec(&ids[0], &image, dir.path()), Some(&nic))
        .await
    {
        Ok(vm) => vm,
        Err(e) => panic!("start with a NIC: {}", crate::manager::chain(&e)),
    };
    if vm.has_exited() {
        vm.destroy().await.unwrap();
        return skip(test, "the VMM stopped at once (nested PVM KVM?)");
    }
    pids.push(vm.pid());
    assert_attached(vm.as_ref(), &name, &netns, nic.mac).await;
    vm.pause().await.unwrap();
    let snap = vm.snapshot(&dir.path().join("snap")).await.unwrap();
    assert_eq!(snap.nic_mac, Some(nic.mac));
    vm.destroy().await.unwrap();
    net.destroy(&ids[0]).await.unwrap();

    // Two clones at once, each in a namespace of its own with its own TAP.
    let mut clones = Vec::new();
    for id in &ids[1..] {
        let (nic, _) = attach(&host, &vmm, id, &policy, None)
            .await
            .unwrap()
            .unwrap();
        clones.push((spec(id, &image, dir.path()), nic));
    }
    let (a, b) = tokio::join!(
        vmm.restore(&clones[0].0, Some(&clones[0].1), &snap),
        vmm.restore(&clones[1].0, Some(&clones[1].1), &snap),
    );
    let vms = match (a, b) {
        (Ok(a), Ok(b)) => [a, b],
        (a, b) => panic!(
            "restores: {:?} / {:?}",
            a.err().map(|e| crate::manager::chain(&e)),
            b.err().map(|e| crate::manager::chain(&e))
        ),
    };
    for (vm, (_, nic)) in vms.iter().zip(&clones) {
        let Tap::Named { name, netns } = &nic.tap else {
            unreachable!()
        };
        pids.push(vm.pid());
        assert_attached(vm.as_ref(), name, netns, nic.mac).await;
    }
    for vm in vms {
        vm.destroy().await.unwrap();
    }
    for id in &ids[1..] {
        net.destroy(id).await.unwrap();
    }

    // Nothing left: processes, namespaces, run dirs, jails.
    for pid in pids {
        assert!(dead(pid), "pid {pid} remains");
    }
    let owned: Vec<OwnedObject> = net.list_owned().await.unwrap();
    let ours: Vec<_> = owned
        .iter()
        .filter(|o| o.sandbox_id().is_some_and(|id| ids.iter().any(|i| i == id)))
        .collect();
    assert!(ours.is_empty(), "left behind: {ours:?}");
    let nslist = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    for id in &ids {
        assert!(!nslist.contains(id.as_str()), "{nslist}");
        assert!(!dir.path().join(id).exists(), "run dir of {id} remains");
    }
    if let Some(base) = jail_base {
        let left: Vec<_> = std::fs::read_dir(base.join("firecracker"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "jails remain: {left:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecracker_takes_its_tap_by_name_in_the_sandbox_namespace() {
    tap_by_name_and_clones(
        "firecracker_takes_its_tap_by_name_in_the_sandbox_namespace",
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jailed_firecracker_takes_its_tap_by_name_in_the_sandbox_namespace() {
    tap_by_name_and_clones(
        "jailed_firecracker_takes_its_tap_by_name_in_the_sandbox_namespace",
        true,
    )
    .await;
}

/// A daemon that died left a detached jailed VM: its command line names only paths inside its
/// chroot, so the restart finds it by its run dir's record, kills it and removes its jail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jailed_vm_a_dead_daemon_left_is_killed_and_its_jail_removed() {
    let test = "a_jailed_vm_a_dead_daemon_left_is_killed_and_its_jail_removed";
    let image = match prerequisites() {
        Ok(i) => i,
        Err(why) => return skip(test, &why),
    };
    let Ok(jailer) = find_jailer() else {
        return skip(test, "no jailer binary (set JAILER_BIN)");
    };
    let dir = tempfile::Builder::new()
        .prefix("hutch-fco")
        .tempdir()
        .unwrap();
    let jails = dir.path().join("jail");
    let mut j = JailerConfig::new(jailer, 12_347, 12_347);
    j.chroot_base = jails.clone();
    let vmm = FirecrackerVmm::with_binary(&image.3).with_jailer(j);
    let id = crate::new_id();
    let spec = VmSpec {
        lifetime: Lifetime::Detached,
        ..spec(&id, &image, dir.path())
    };
    let vm = match vmm.start(&spec).await {
        Ok(vm) => vm,
        Err(e) => panic!("jailed start: {}", crate::manager::chain(&e)),
    };
    let pid = vm.pid();
    if vm.has_exited() {
        vm.destroy().await.unwrap();
        return skip(test, "the VMM stopped at once (nested PVM KVM?)");
    }
    drop(vm); // the daemon dies; a detached VM runs on
    assert!(!dead(pid), "a detached VM outlives its handle");
    let args = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let runs = format!("{}/", dir.path().display());
    assert!(
        !String::from_utf8_lossy(&args).contains(&runs),
        "the jailed VMM's command line names its run dir; this test would not test the record"
    );

    // The restart owns nothing: a command-line match alone would not find the VM.
    let killed = hutch_vmm::orphans::kill_unowned_vmms(dir.path(), &[]);
    assert_eq!(killed, 1, "the jailed VMM is found by its record");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !dead(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "pid {pid} survived SIGKILL"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(hutch_vmm::orphans::remove_unowned_jails(&jails, &[]), 1);
    assert_eq!(hutch_vmm::orphans::remove_unowned_dirs(dir.path(), &[]), 1);
    let left: Vec<_> = std::fs::read_dir(jails.join("firecracker"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "jails remain: {left:?}");
    assert!(!spec.run_dir.exists(), "the run dir remains");
}
