//! Manual smoke check: prints the host report and the accelerator decision, then boots a VM and
//! keeps it running for SECONDS (default 30) before destroying it.
//!
//! `cargo run -p hutch-vmm --example smoke -- KERNEL INITRD ROOTFS [SECONDS]`

use std::path::PathBuf;
use std::time::Duration;

use hutch_vmm::{host_report, probe_accel, Lifetime, QemuVmm, VmSpec, Vmm};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: smoke KERNEL INITRD ROOTFS [SECONDS]");
        std::process::exit(2);
    }
    let (kernel, initrd, rootfs) = (
        PathBuf::from(&args[0]),
        PathBuf::from(&args[1]),
        PathBuf::from(&args[2]),
    );
    let secs: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(30);
    println!("{}", serde_json::to_string_pretty(&host_report())?);
    let dir = std::env::temp_dir().join(format!("hutch-smoke-{}", std::process::id()));
    let report = probe_accel(&kernel, &initrd, &dir.join("accel.json")).await;
    println!("accel: {} ({})", report.accel, report.reason);
    let vm = QemuVmm::new(report.accel)?
        .start(&VmSpec {
            shares: Vec::new(),
            id: format!("smoke-{}", std::process::id()),
            kernel,
            initrd,
            rootfs,
            cpus: 2,
            memory_mib: 512,
            scratch_disk_mib: 256,
            run_dir: dir.join("vm"),
            extra_cmdline: vec![],
            lifetime: Lifetime::Owned,
            memory: hutch_vmm::GuestMemory::Anonymous,
        })
        .await?;
    println!("pid {} console {}", vm.pid(), vm.console_log().display());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    vm.destroy().await?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
