//! Detached VMs: they outlive their handle and their starter (even `kill -9`), are adopted back
//! by (pid, start time), pause and resume. Real QEMU; see `common/mod.rs` for the inputs and the
//! SKIP/`HUTCH_REQUIRE_VM_TESTS` rules.

// Tests wait on processes and threads synchronously, on threads of their own.
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{fixture, pid_alive, pids_named, wait_for_console};
use hutch_vmm::{kill_recorded, Accel, Lifetime, QemuVmm, Vm, VmSpec, Vmm, VmmError};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// TCG boots are slow, and tests run in parallel on small hosts.
const BOOT_LIMIT: Duration = Duration::from_secs(90);

/// Environment of the helper process that starts a detached VM and is then SIGKILLed.
const HELPER_ENV: &str = "HUTCH_VMM_TEST_SPAWNER";

fn spec(kernel: &Path, initrd: &Path, rootfs: &Path, id: String, run_dir: PathBuf) -> VmSpec {
    VmSpec {
        shares: Vec::new(),
        id,
        kernel: kernel.into(),
        initrd: initrd.into(),
        rootfs: rootfs.into(),
        cpus: 2,
        memory_mib: 256,
        scratch_disk_mib: 0,
        run_dir,
        extra_cmdline: vec![],
        lifetime: Lifetime::Detached,
        memory: hutch_vmm::GuestMemory::Anonymous,
    }
}

/// Sends `msg` on a fresh channel connection and returns the guest's reply line, or `None`
/// within `limit`.
async fn ping(vm: &dyn Vm, msg: &str, limit: Duration) -> Option<String> {
    let mut chan = vm.connect_channel().await.unwrap();
    chan.write_all(format!("{msg}\n").as_bytes()).await.unwrap();
    let mut line = String::new();
    let mut rd = BufReader::new(&mut chan);
    match tokio::time::timeout(limit, rd.read_line(&mut line)).await {
        Ok(r) => {
            r.unwrap();
            Some(line)
        }
        Err(_) => None,
    }
}

/// Kills a detached VM when a test fails half-way (dropping its handle would leave it running).
struct KillOnPanic(u32, u64);

impl Drop for KillOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = kill_recorded(self.0, self.1);
        }
    }
}

fn assert_gone(id: &str, pid: u32, run_dir: &Path) {
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "qemu pid {pid} still exists (running or unreaped)"
    );
    assert_eq!(pids_named(id), Vec::<u32>::new(), "hutch-{id} remains");
    assert!(!run_dir.exists(), "{} remains", run_dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_vm_outlives_its_handle_is_adopted_pauses_and_resumes() {
    let Some(fx) = fixture("detached_vm_outlives_its_handle_is_adopted_pauses_and_resumes") else {
        return;
    };
    if !fx.has_modules {
        common::skip(
            "detached_vm_…",
            "no virtio modules: the guest cannot answer",
        );
        return;
    }
    let id = format!("det-{}", std::process::id());
    let run_dir = fx.dir.path().join("det");
    let spec = spec(
        &fx.kernel,
        &fx.initrd,
        &fx.rootfs,
        id.clone(),
        run_dir.clone(),
    );
    let vm = QemuVmm::new(Accel::Tcg)
        .unwrap()
        .start(&spec)
        .await
        .unwrap();
    let (pid, start) = (vm.pid(), vm.start_time());
    let _guard = KillOnPanic(pid, start);
    assert!(start > 0);
    assert_eq!(
        ping(&*vm, "a", BOOT_LIMIT).await.as_deref(),
        Some("pong:a\n")
    );
    // A second client after the first disconnected (a restarted daemon) is served too.
    assert_eq!(
        ping(&*vm, "b", BOOT_LIMIT).await.as_deref(),
        Some("pong:b\n")
    );
    wait_for_console(vm.console_log(), "hutch-echo b", BOOT_LIMIT).await;

    drop(vm);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(pid_alive(pid), "dropping a detached handle killed the VM");
    assert!(run_dir.join("channel.sock").exists());

    // A forged start time (a recycled pid) is refused, by adopt and by kill_recorded.
    let identity = run_dir.join("identity.json");
    let real = std::fs::read_to_string(&identity).unwrap();
    let forged = real.replace(
        &format!("\"start_time\":{start},"),
        &format!("\"start_time\":{},", start + 1),
    );
    assert_ne!(forged, real);
    std::fs::write(&identity, forged).unwrap();
    let vmm = QemuVmm::new(Accel::Tcg).unwrap();
    match vmm.adopt(&id, &run_dir).await {
        Err(VmmError::Gone { why, .. }) => assert!(why.contains("recorded"), "{why}"),
        other => panic!("forged identity adopted: {other:?}"),
    }
    std::fs::write(&identity, real).unwrap();
    assert!(!kill_recorded(pid, start + 1).unwrap());
    assert!(
        pid_alive(pid),
        "kill_recorded killed a mismatched start time"
    );

    let vm = vmm.adopt(&id, &run_dir).await.unwrap();
    assert_eq!(
        (vm.pid(), vm.start_time(), vm.accel()),
        (pid, start, Accel::Tcg)
    );
    assert_eq!(
        ping(&*vm, "c", BOOT_LIMIT).await.as_deref(),
        Some("pong:c\n")
    );
    // The adopter copies the console again, appending to the same log.
    wait_for_console(vm.console_log(), "hutch-echo c", BOOT_LIMIT).await;
    let log = std::fs::read_to_string(vm.console_log()).unwrap();
    assert!(log.contains("Linux version") && log.contains("hutch-echo b"));

    assert!(!vm.is_paused().await.unwrap());
    vm.pause().await.unwrap();
    assert!(vm.is_paused().await.unwrap());
    // A paused guest does not answer…
    let mut chan = vm.connect_channel().await.unwrap();
    chan.write_all(b"d\n").await.unwrap();
    let mut rd = BufReader::new(&mut chan);
    let mut line = String::new();
    assert!(
        tokio::time::timeout(Duration::from_secs(2), rd.read_line(&mut line))
            .await
            .is_err(),
        "a paused guest answered {line:?}"
    );
    // … and after resume it carries on where it stopped.
    vm.resume().await.unwrap();
    assert!(!vm.is_paused().await.unwrap());
    tokio::time::timeout(BOOT_LIMIT, rd.read_line(&mut line))
        .await
        .expect("no answer after resume")
        .unwrap();
    assert_eq!(line, "pong:d\n");
    drop(rd);
    drop(chan);

    vm.destroy().await.unwrap();
    assert_gone(&id, pid, &run_dir);
    match vmm.adopt(&id, &run_dir).await {
        Err(VmmError::Gone { .. }) => {}
        other => panic!("adopted a destroyed VM: {other:?}"),
    }
}

/// The helper process of [`detached_vm_survives_sigkill_of_its_starter`]: when `HELPER_ENV` is
/// set, starts the VM it describes, reports `pid start_time`, and waits to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawner_helper() {
    let Ok(env) = std::env::var(HELPER_ENV) else {
        return;
    };
    let p: Vec<PathBuf> = env.split('\n').map(PathBuf::from).collect();
    let [kernel, initrd, rootfs, id, run_dir, out] = &p[..] else {
        panic!("bad {HELPER_ENV}");
    };
    let id = id.to_str().unwrap().to_string();
    let vm = QemuVmm::new(Accel::Tcg)
        .unwrap()
        .start(&spec(kernel, initrd, rootfs, id, run_dir.clone()))
        .await
        .unwrap();
    std::fs::write(out, format!("{} {}", vm.pid(), vm.start_time())).unwrap();
    tokio::time::sleep(Duration::from_secs(600)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_vm_survives_sigkill_of_its_starter() {
    let Some(fx) = fixture("detached_vm_survives_sigkill_of_its_starter") else {
        return;
    };
    // Orphans are reparented to us instead of init, so destroy can reap the VM (as a daemon
    // that is a subreaper would).
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
        .expect("become a subreaper");
    let id = format!("orphan-{}", std::process::id());
    let run_dir = fx.dir.path().join("orphan");
    let out = fx.dir.path().join("helper.out");
    let env = [
        &fx.kernel,
        &fx.initrd,
        &fx.rootfs,
        Path::new(&id),
        &run_dir,
        &out,
    ]
    .map(|p| p.to_str().unwrap().to_string())
    .join("\n");
    let mut helper = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "spawner_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, env)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let reported = loop {
        if let Ok(s) = std::fs::read_to_string(&out) {
            if let Some((pid, start)) = s.split_once(' ') {
                break (pid.parse::<u32>().unwrap(), start.parse::<u64>().unwrap());
            }
        }
        if let Ok(Some(status)) = helper.try_wait() {
            panic!("helper exited early: {status}");
        }
        assert!(t0.elapsed() < BOOT_LIMIT, "helper did not start the VM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // SAFETY: kill(2) of our own child, unreaped.
    assert_eq!(unsafe { libc::kill(helper.id() as i32, libc::SIGKILL) }, 0);
    helper.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (pid, start) = reported;
    let _guard = KillOnPanic(pid, start);
    assert!(pid_alive(pid), "the VM died with its starter");

    let vm = QemuVmm::new(Accel::Tcg)
        .unwrap()
        .adopt(&id, &run_dir)
        .await
        .unwrap();
    assert_eq!((vm.pid(), vm.start_time()), (pid, start));
    // Its own session, and SIGPIPE ignored (QEMU's own setting), so the dead starter's stderr
    // pipe cannot kill it.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let session: u32 = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(3)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(session, pid, "not a session leader");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ign = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .unwrap()
        .trim();
    let ign = u64::from_str_radix(ign, 16).unwrap();
    assert_ne!(
        ign & (1 << (libc::SIGPIPE - 1)),
        0,
        "qemu does not ignore SIGPIPE"
    );
    if fx.has_modules {
        assert_eq!(
            ping(&*vm, "x", BOOT_LIMIT).await.as_deref(),
            Some("pong:x\n")
        );
    }
    vm.destroy().await.unwrap();
    assert_gone(&id, pid, &run_dir);
    assert!(!kill_recorded(pid, start).unwrap(), "nothing left to kill");
}
