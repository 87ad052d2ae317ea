//! Boots real VMs: the Debian kernel from `HUTCH_TEST_KERNEL` with a busybox initramfs built by
//! the test. See `common/mod.rs` for the inputs and the SKIP/`HUTCH_REQUIRE_VM_TESTS` rules.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{fixture, pids_named, skip, wait_for_console};
use hutch_vmm::{
    probe_accel_with, Accel, AccelOverride, Lifetime, QemuVmm, VmSpec, Vmm, VmmError, PROBE_MARKER,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// TCG boots are slow, and tests run in parallel on small hosts.
const BOOT_LIMIT: Duration = Duration::from_secs(90);

fn spec(fx: &common::Fixture, id: &str) -> VmSpec {
    VmSpec {
        shares: Vec::new(),
        id: format!("{id}-{}", std::process::id()),
        kernel: fx.kernel.clone(),
        initrd: fx.initrd.clone(),
        rootfs: fx.rootfs.clone(),
        cpus: 2,
        memory_mib: 256,
        scratch_disk_mib: 64,
        run_dir: fx.dir.path().join(id),
        extra_cmdline: vec![],
        lifetime: Lifetime::Owned,
        memory: hutch_vmm::GuestMemory::Anonymous,
    }
}

fn assert_gone(id: &str, pid: u32, run_dir: &Path) {
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "qemu pid {pid} still exists (running or unreaped)"
    );
    assert_eq!(
        pids_named(id),
        Vec::<u32>::new(),
        "a process named hutch-{id} remains"
    );
    assert!(!run_dir.exists(), "{} remains", run_dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcg_boot_channel_and_destroy() {
    let Some(fx) = fixture("tcg_boot_channel_and_destroy") else {
        return;
    };
    let spec = spec(&fx, "boot");
    let vmm = QemuVmm::new(Accel::Tcg).unwrap();
    let t0 = Instant::now();
    let vm = vmm.start(&spec).await.unwrap();
    let started = t0.elapsed();
    let (pid, run_dir) = (vm.pid(), vm.run_dir().to_path_buf());
    assert_eq!(vm.id(), spec.id);
    assert_eq!(vm.accel(), Accel::Tcg);
    assert_eq!(
        pids_named(&spec.id),
        vec![pid],
        "ps finds the VM by -name hutch-<id>"
    );
    assert!(run_dir.join("scratch.ext4").is_file());

    wait_for_console(vm.console_log(), PROBE_MARKER, BOOT_LIMIT).await;
    let booted = t0.elapsed();
    eprintln!(
        "TIMING tcg: qemu ready {} ms, spawn to {PROBE_MARKER} {} ms",
        started.as_millis(),
        booted.as_millis()
    );
    let console = std::fs::read_to_string(vm.console_log()).unwrap();
    assert!(
        console.contains("Linux version"),
        "no kernel banner:\n{console}"
    );
    assert!(
        console.contains("tsc_early_khz="),
        "timer args missing:\n{console}"
    );

    let mut chan = vm.connect_channel().await.unwrap();
    if fx.has_modules {
        // The guest answers one line on the hutch.0 port: a full host↔guest round trip.
        chan.write_all(b"ping\n").await.unwrap();
        let mut line = String::new();
        let mut rd = BufReader::new(&mut chan);
        tokio::time::timeout(BOOT_LIMIT, rd.read_line(&mut line))
            .await
            .expect("no reply on the channel")
            .unwrap();
        assert_eq!(line, "pong:ping\n");
        // The reply on the channel can overtake the slower serial console: wait for the echo
        // the guest prints after replying, so every earlier console line has been written.
        wait_for_console(vm.console_log(), "hutch-echo ping", BOOT_LIMIT).await;
        let console = std::fs::read_to_string(vm.console_log()).unwrap();
        assert!(console.contains("serial=hutch-root ro=1"), "{console}");
        assert!(console.contains("serial=hutch-scratch ro=0"), "{console}");
        assert!(
            console
                .lines()
                .any(|l| l.trim_end() == "hutch-label vdb=hutch-scratch"),
            "{console}"
        );
    } else {
        skip(
            "tcg_boot_channel_and_destroy (channel round trip)",
            "no virtio modules found next to the kernel; only the connect was checked",
        );
    }
    drop(chan);
    assert!(!vm.has_exited());

    let t1 = Instant::now();
    vm.destroy().await.unwrap();
    eprintln!("TIMING destroy {} ms", t1.elapsed().as_millis());
    assert_gone(&spec.id, pid, &run_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_without_destroy_leaves_nothing() {
    let Some(fx) = fixture("drop_without_destroy_leaves_nothing") else {
        return;
    };
    let spec = spec(&fx, "drop");
    let vm = QemuVmm::new(Accel::Tcg)
        .unwrap()
        .start(&spec)
        .await
        .unwrap();
    let (pid, run_dir) = (vm.pid(), vm.run_dir().to_path_buf());
    assert!(run_dir.join("channel.sock").exists());
    drop(vm);
    assert_gone(&spec.id, pid, &run_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_failure_is_one_line_and_leaves_nothing() {
    let Some(fx) = fixture("qemu_failure_is_one_line_and_leaves_nothing") else {
        return;
    };
    let mut spec = spec(&fx, "bad");
    // Readable, but not a kernel: QEMU itself refuses it.
    spec.kernel = fx.rootfs.clone();
    let err = match QemuVmm::new(Accel::Tcg).unwrap().start(&spec).await {
        Ok(_) => panic!("a non-kernel booted"),
        Err(e) => e,
    };
    let msg = err.to_string();
    eprintln!("error: {msg}");
    assert!(matches!(err, VmmError::QemuExited { .. }), "{err:?}");
    assert!(!msg.contains('\n'), "{msg:?}");
    assert!(!spec.run_dir.exists());
    assert_eq!(pids_named(&spec.id), Vec::<u32>::new());

    spec.kernel = fx.dir.path().join("no-such-vmlinuz");
    let err = QemuVmm::new(Accel::Tcg)
        .unwrap()
        .start(&spec)
        .await
        .err()
        .unwrap();
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(
        chain.starts_with("kernel ") && chain.contains("No such file"),
        "{chain}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_is_bounded_cached_and_clean() {
    let Some(fx) = fixture("probe_is_bounded_cached_and_clean") else {
        return;
    };
    let cache = fx.dir.path().join("cache/accel.json");
    let t0 = Instant::now();
    let r = probe_accel_with(AccelOverride::Auto, &fx.kernel, &fx.initrd, &cache).await;
    let took = t0.elapsed();
    eprintln!(
        "PROBE {:?} in {} ms: {}",
        r.accel,
        took.as_millis(),
        r.reason
    );
    assert!(took < Duration::from_secs(20), "probe took {took:?}");
    assert!(!r.cached);
    let probe_name = format!("probe-{}", std::process::id());
    assert_eq!(
        pids_named(&probe_name),
        Vec::<u32>::new(),
        "probe VM left running"
    );
    if cache.exists() {
        let t1 = Instant::now();
        let again = probe_accel_with(AccelOverride::Auto, &fx.kernel, &fx.initrd, &cache).await;
        assert!(again.cached, "{again:?}");
        assert_eq!((again.accel, &again.reason), (r.accel, &r.reason));
        assert!(t1.elapsed() < Duration::from_secs(2));
    } else {
        // Only real boots are cached; /dev/kvm must have been unusable.
        assert!(r.reason.contains("/dev/kvm"), "{r:?}");
    }
}

/// Boot-time comparison with and without the TCG timer arguments. Ignored by default: without
/// them a boot can stall for a minute. Run with `--ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_tcg_boot_times() {
    let Some(fx) = fixture("measure_tcg_boot_times") else {
        return;
    };
    let runs: usize = std::env::var("HUTCH_MEASURE_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    for timer_args in [true, false] {
        let mut vmm = QemuVmm::new(Accel::Tcg).unwrap();
        if !timer_args {
            vmm = vmm.without_timer_args();
        }
        let mut times = Vec::new();
        for i in 0..runs {
            let mut s = spec(&fx, &format!("m{}-{i}", timer_args as u8));
            s.scratch_disk_mib = 0;
            let t0 = Instant::now();
            let vm = vmm.start(&s).await.unwrap();
            let limit = Duration::from_secs(30);
            let log = vm.console_log().to_path_buf();
            let ok = tokio::time::timeout(limit, async {
                loop {
                    if std::fs::read_to_string(&log)
                        .unwrap_or_default()
                        .contains(PROBE_MARKER)
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .is_ok();
            let ms = t0.elapsed().as_millis();
            times.push(if ok {
                format!("{ms}")
            } else {
                format!(">{ms}")
            });
            vm.destroy().await.unwrap();
        }
        eprintln!(
            "TIMING timer_args={timer_args}: spawn to {PROBE_MARKER} ms: {}",
            times.join(" ")
        );
    }
}
