//! Snapshots on QEMU with the real `default` image (agent as PID 1): a template booted with its
//! RAM in a shared file is saved without its RAM, restored twice at once as copy-on-write
//! clones, and one clone is forked (saved with its RAM) into a child.
//!
//! Needs QEMU and the `default` image (`hutch image build`) in `$HUTCH_HOME` (default
//! `/var/lib/hutch`); otherwise a SKIP line, or a failure with `HUTCH_REQUIRE_VM_TESTS=1`.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::{pids_named, skip};
use hutch_protocol::{
    host::{Channel, ExecEvent},
    ExecRequest, ExitStatus, Setup,
};
use hutch_vmm::{Accel, GuestMemory, Lifetime, QemuVmm, SnapshotMemory, Vm, VmSpec, Vmm};
use sha2::{Digest, Sha256};

/// TCG boots are slow, and tests run in parallel on small hosts.
const BOOT_LIMIT: Duration = Duration::from_secs(120);

fn image() -> Result<hutch_image::Image, String> {
    hutch_vmm::find_qemu().map_err(|e| e.to_string())?;
    let home = std::env::var_os("HUTCH_HOME")
        .map_or_else(|| PathBuf::from("/var/lib/hutch"), PathBuf::from);
    hutch_image::open(&home.join("images"), "default")
        .map_err(|e| format!("no default image in {}: {e}", home.display()))
}

fn spec(image: &hutch_image::Image, id: &str, run_dir: PathBuf, memory: GuestMemory) -> VmSpec {
    VmSpec {
        shares: Vec::new(),
        id: id.into(),
        kernel: image.kernel.clone(),
        initrd: image.initrd.clone(),
        rootfs: image.rootfs.clone(),
        cpus: 1,
        memory_mib: 256,
        scratch_disk_mib: 256,
        run_dir,
        extra_cmdline: vec![],
        lifetime: Lifetime::Owned,
        memory,
    }
}

/// Handshakes with the agent and gives the guest fresh boot facts.
async fn attach(vm: &dyn Vm, hostname: &str) -> Channel {
    let connect = async {
        let stream = vm.connect_channel().await.unwrap();
        Channel::connect(stream).await
    };
    let ch = match tokio::time::timeout(BOOT_LIMIT, connect).await {
        Ok(Ok(ch)) => ch,
        other => panic!(
            "no agent on {}: {:?}; console:\n{}",
            vm.id(),
            other.map(|r| r.err()),
            std::fs::read_to_string(vm.console_log()).unwrap_or_default()
        ),
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap();
    let mut entropy = vec![0u8; 32];
    getrandom(&mut entropy);
    ch.setup(Setup {
        entropy,
        unix_secs: now.as_secs(),
        unix_nanos: now.subsec_nanos(),
        hostname: hostname.into(),
    })
    .await
    .unwrap();
    ch
}

fn getrandom(buf: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(buf)
        .unwrap();
}

/// Runs `script` under `sh -c`; returns (exit code, stdout).
async fn run(ch: &Channel, script: &str) -> (i32, String) {
    let mut req = ExecRequest::shell(script);
    req.timeout_ms = Some(60_000);
    let mut exec = ch.exec(req).await.unwrap();
    let mut out = Vec::new();
    loop {
        match exec.next_event().await.unwrap() {
            ExecEvent::Stdout(d) => out.extend(d),
            ExecEvent::Stderr(_) => {}
            ExecEvent::Exited(info) => {
                let code = match info.status {
                    ExitStatus::Code(c) => c,
                    ExitStatus::Signal(s) => 128 + s,
                };
                return (code, String::from_utf8_lossy(&out).trim().to_string());
            }
        }
    }
}

fn digest(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    hex::encode(Sha256::digest(&bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_clones_and_a_fork_are_isolated_copies() {
    let test = "template_clones_and_a_fork_are_isolated_copies";
    let image = match image() {
        Ok(i) => i,
        Err(why) => return skip(test, &why),
    };
    let tag = std::process::id();
    let dir = tempfile::Builder::new()
        .prefix("hutch-snap")
        .tempdir()
        .unwrap();
    let shm = tempfile::Builder::new()
        .prefix("hutch-snap-test")
        .tempdir_in("/dev/shm")
        .unwrap();
    let mem = shm.path().join("template.mem");
    let vmm = QemuVmm::new(Accel::Tcg).unwrap();

    // The template: boot, leave a file, save without RAM.
    let tid = format!("tpl-{tag}");
    let template = vmm
        .start(&spec(
            &image,
            &tid,
            dir.path().join(&tid),
            GuestMemory::SharedFile(mem.clone()),
        ))
        .await
        .unwrap();
    let ch = attach(template.as_ref(), "template").await;
    assert_eq!(run(&ch, "echo base > /root/base && sync").await.0, 0);
    template.pause().await.unwrap();
    let snap_dir = dir.path().join("tpl-snap");
    let snap = template.snapshot(&snap_dir).await.unwrap();
    assert!(template.is_paused().await.unwrap());
    assert_eq!(snap.memory, SnapshotMemory::File(mem.clone()));
    assert_eq!(snap.disk_format.as_deref(), Some("raw"));
    assert_eq!(hutch_vmm::Snapshot::load(&snap_dir).unwrap(), snap);
    let state_len = std::fs::metadata(snap.state_file()).unwrap().len();
    assert!(
        state_len < 4 << 20,
        "RAM was saved: {state_len} bytes of state"
    );
    drop(ch);
    template.destroy().await.unwrap();
    let mem_digest = digest(&mem);

    // Two clones at once: same files as the template, then each its own.
    let ids = [format!("cla-{tag}"), format!("clb-{tag}")];
    let restores = ids.iter().map(|id| {
        let spec = spec(&image, id, dir.path().join(id), GuestMemory::Anonymous);
        let (vmm, snap) = (&vmm, &snap);
        async move { vmm.restore(&spec, None, snap).await.unwrap() }
    });
    let clones = futures::future::join_all(restores).await;
    let mut chans = Vec::new();
    for (vm, id) in clones.iter().zip(&ids) {
        assert!(vm.is_paused().await.unwrap(), "a restore comes back paused");
        vm.resume().await.unwrap();
        chans.push(attach(vm.as_ref(), id).await);
    }
    for (ch, id) in chans.iter().zip(&ids) {
        assert_eq!(run(ch, "cat /root/base").await, (0, "base".into()));
        assert_eq!(run(ch, "hostname").await, (0, id.clone()));
        let (_, clock) = run(ch, "date +%s").await;
        let host = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let guest: i64 = clock.parse().unwrap();
        assert!(
            (guest - host).abs() <= 2,
            "guest clock {guest}, host {host}"
        );
    }
    let rand: Vec<_> = futures::future::join_all(
        chans
            .iter()
            .map(|ch| run(ch, "head -c 32 /dev/urandom | od -An -tx1")),
    )
    .await;
    assert_ne!(
        rand[0], rand[1],
        "two clones produced the same random bytes"
    );
    assert_eq!(run(&chans[0], "echo a > /root/a && sync").await.0, 0);
    assert_eq!(
        run(&chans[1], "test -e /root/a").await.0,
        1,
        "clone B sees clone A's file"
    );

    // Fork clone A: its child has A's files from before the fork, and not after.
    clones[0].pause().await.unwrap();
    let fork = clones[0].snapshot(&dir.path().join("fork")).await.unwrap();
    assert_eq!(fork.memory, SnapshotMemory::InState);
    assert_eq!(fork.disk_format.as_deref(), Some("qcow2"));
    clones[0].resume().await.unwrap();
    assert_eq!(
        run(&chans[0], "echo later > /root/later && sync").await.0,
        0
    );
    let kid_id = format!("kid-{tag}");
    let kid = vmm
        .restore(
            &spec(
                &image,
                &kid_id,
                dir.path().join(&kid_id),
                GuestMemory::Anonymous,
            ),
            None,
            &fork,
        )
        .await
        .unwrap();
    kid.resume().await.unwrap();
    let kch = attach(kid.as_ref(), &kid_id).await;
    assert_eq!(
        run(&kch, "cat /root/a /root/base").await,
        (0, "a\nbase".into())
    );
    assert_eq!(
        run(&kch, "test -e /root/later").await.0,
        1,
        "the child sees a later write"
    );

    // Nothing a clone wrote reached the template's memory or disk.
    assert_eq!(
        digest(&mem),
        mem_digest,
        "a clone changed the template's memory file"
    );
    let mut pids = Vec::new();
    for (vm, ch) in clones
        .into_iter()
        .chain([kid])
        .zip(chans.into_iter().chain([kch]))
    {
        drop(ch);
        pids.push((vm.pid(), vm.id().to_string(), vm.run_dir().to_path_buf()));
        vm.destroy().await.unwrap();
    }
    for (pid, id, run_dir) in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} remains"
        );
        assert_eq!(pids_named(&id), Vec::<u32>::new());
        assert!(!run_dir.exists(), "{} remains", run_dir.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_refuse_a_mismatched_spec_before_starting_anything() {
    let test = "restores_refuse_a_mismatched_spec_before_starting_anything";
    let image = match image() {
        Ok(i) => i,
        Err(why) => return skip(test, &why),
    };
    let dir = tempfile::tempdir().unwrap();
    let snap = hutch_vmm::Snapshot {
        backend: "qemu".into(),
        dir: dir.path().join("snap"),
        memory: SnapshotMemory::InState,
        cpus: 1,
        memory_mib: 256,
        nic_mac: None,
        disk_format: None,
        boot: None,
    };
    let vmm = QemuVmm::new(Accel::Tcg).unwrap();
    let run_dir = dir.path().join("vm");
    let mut bigger = spec(&image, "mismatch", run_dir.clone(), GuestMemory::Anonymous);
    bigger.memory_mib = 512;
    let err = vmm.restore(&bigger, None, &snap).await.unwrap_err();
    assert!(err.to_string().contains("256 MiB"), "{err}");
    let other = hutch_vmm::Snapshot {
        backend: "firecracker".into(),
        ..snap.clone()
    };
    let same = spec(&image, "mismatch", run_dir.clone(), GuestMemory::Anonymous);
    let err = vmm.restore(&same, None, &other).await.unwrap_err();
    assert!(err.to_string().contains("firecracker"), "{err}");
    let rebuilt = hutch_vmm::Snapshot {
        boot: Some(hutch_vmm::BootFiles {
            rootfs: dir.path().join("an-older-rootfs"),
            ..hutch_vmm::BootFiles::of(&same)
        }),
        ..snap.clone()
    };
    let err = vmm.restore(&same, None, &rebuilt).await.unwrap_err();
    assert!(err.to_string().contains("image rebuilt"), "{err}");
    let err = vmm.restore(&same, None, &snap).await.unwrap_err();
    assert!(
        err.to_string().contains("snapshot state"),
        "missing state: {err}"
    );
    assert!(!run_dir.exists(), "a refused restore left its run dir");
}
