//! `hutch-bench firecracker`: Firecracker process start → API ready, snapshot create, and
//! snapshot restore (a fresh process loading the snapshot), as p50/p95 over N runs. Without a
//! firecracker binary it prints a SKIP line; without KVM that runs guests or a default image
//! only the start is measured.

use std::time::{Duration, Instant};

use clap::Args;
use hutch_vmm::firecracker::{
    api::SnapshotType, find_firecracker_or_in, FirecrackerClient, LaunchOptions, RestoreOptions,
    SnapshotFiles,
};
use hutch_vmm::{FirecrackerVmm, GuestMemory, Lifetime, Vm, VmSpec};

use crate::error::BenchError;
use hutch_daemon::Home;

/// How long one Firecracker process may take to answer on its API socket.
const API_READY: Duration = Duration::from_secs(10);

/// `hutch-bench firecracker`.
#[derive(Debug, Args)]
pub struct BenchFirecrackerArgs {
    /// Runs of each measurement.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub runs: u16,
    /// Guest memory of the snapshotted VM, in MiB (the snapshot writes all of it).
    #[arg(long, default_value_t = 128)]
    pub memory_mib: u32,
    /// Guest image whose kernel, initrd and rootfs the snapshotted VM uses.
    #[arg(long, default_value = "default")]
    pub image: String,
}

/// Runs the benchmark.
pub async fn firecracker(home: &Home, args: BenchFirecrackerArgs) -> Result<i32, BenchError> {
    let fc = match find_firecracker_or_in(&home.bin()) {
        Ok(p) => p,
        Err(e) => {
            println!("SKIP hutch-bench firecracker: {e}, or run `hutch setup firecracker`");
            return Ok(0);
        }
    };
    let work = tempfile::Builder::new()
        .prefix("bench-fc-")
        .tempdir_in(home.local_vms())
        .map_err(BenchError::Io)?;
    let runs = usize::from(args.runs);
    println!("firecracker {} ({runs} runs)", fc.display());

    let mut starts = Vec::with_capacity(runs);
    for i in 0..runs {
        let sock = work.path().join(format!("api-{i}.sock"));
        let mut child = tokio::process::Command::new(&fc)
            .arg("--api-sock")
            .arg(&sock)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(BenchError::Io)?;
        let t = Instant::now();
        let client = FirecrackerClient::new(&sock).with_timeout(Duration::from_millis(500));
        let ready = loop {
            if client.describe_instance().await.is_ok() {
                break Some(t.elapsed());
            }
            if t.elapsed() > API_READY || matches!(child.try_wait(), Ok(Some(_))) {
                break None;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        let _ = child.start_kill();
        let _ = child.wait().await;
        let _ = std::fs::remove_file(&sock);
        match ready {
            Some(d) => starts.push(d),
            None => {
                return Err(BenchError::Usage(format!(
                    "{} did not answer on its API socket within {API_READY:?}",
                    fc.display()
                )))
            }
        }
    }
    println!("  process start → API ready   {}", summary(&mut starts));

    let image = match hutch_image::open(&home.images(), &args.image) {
        Ok(i) => i,
        Err(e) => {
            println!("SKIP snapshot create/restore: {e}");
            return Ok(0);
        }
    };
    let vmm = FirecrackerVmm::with_binary(&fc);
    let kernel = hutch_core::kernel_for(&vmm, &image);
    let spec = |name: &str| VmSpec {
        shares: Vec::new(),
        id: name.to_string(),
        kernel: kernel.clone(),
        initrd: image.initrd.clone(),
        rootfs: image.rootfs.clone(),
        cpus: 1,
        memory_mib: args.memory_mib,
        scratch_disk_mib: 0,
        run_dir: work.path().join(name),
        extra_cmdline: vec![],
        lifetime: Lifetime::Owned,
        memory: GuestMemory::Anonymous,
    };
    let (mut creates, mut restores) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let vm = vmm
            .start_with(&spec(&format!("bench-fc-{i}")), &LaunchOptions::default())
            .await?;
        if vm.has_exited() {
            println!("SKIP snapshot create/restore: the guest stopped Firecracker at once (KVM that does not run guests?): {}", vm.vmm_stderr());
            return Ok(0);
        }
        vm.pause().await?;
        let dir = work.path().join(format!("snap-{i}"));
        std::fs::create_dir(&dir).map_err(BenchError::Io)?;
        let files = SnapshotFiles::in_dir(&dir);
        let t = Instant::now();
        vm.snapshot_create(SnapshotType::Full, &files).await?;
        creates.push(t.elapsed());
        Box::new(vm).destroy().await?;

        let t = Instant::now();
        let restored = vmm
            .restore_snapshot(
                &spec(&format!("bench-fc-r{i}")),
                &RestoreOptions::default(),
                &files,
            )
            .await?;
        restores.push(t.elapsed());
        Box::new(restored).destroy().await?;
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!(
        "  snapshot create (full, {} MiB) {}",
        args.memory_mib,
        summary(&mut creates)
    );
    println!(
        "  restore: process start → loaded (paused) {}",
        summary(&mut restores)
    );
    Ok(0)
}

/// `p50 X  p95 Y  (min Z, max W)` of the samples.
fn summary(samples: &mut [Duration]) -> String {
    samples.sort();
    let pct = |p: usize| samples[(samples.len() * p / 100).min(samples.len() - 1)];
    format!(
        "p50 {:.1?}  p95 {:.1?}  (min {:.1?}, max {:.1?})",
        pct(50),
        pct(95),
        samples[0],
        samples[samples.len() - 1]
    )
}
