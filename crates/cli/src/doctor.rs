//! `hutch doctor`: what this host has and lacks, each with its remedy.

use crate::{agent_bin, error::CliError};
use hutch_daemon::Home;

/// One line of the report.
struct Check {
    ok: bool,
    what: &'static str,
    detail: String,
}

impl Check {
    fn new(what: &'static str, result: Result<String, String>) -> Check {
        let ok = result.is_ok();
        let detail = result.unwrap_or_else(|e| e);
        Check { ok, what, detail }
    }
}

/// Prints the report; exits 1 when sandboxes cannot run here yet.
pub async fn doctor(home: &Home) -> Result<i32, CliError> {
    let host = tokio::task::spawn_blocking(hutch_vmm::host_report)
        .await
        .map_err(|_| CliError::Interrupted)?;
    let kvm = &host.kvm;
    let image = hutch_image::open(&home.images(), "default");
    let mut checks = vec![
        Check::new(
            "qemu",
            host.qemu.as_ref().map(|q| format!("{} ({})", q.version, q.path.display())).map_err(Clone::clone),
        ),
        Check::new(
            "/dev/kvm",
            match (kvm.present, kvm.openable) {
                (true, true) => Ok("present and openable".into()),
                (true, false) => Err(format!(
                    "present but not openable ({}): add your user to group kvm, or VMs use TCG (slow)",
                    kvm.error.as_deref().unwrap_or("unknown error")
                )),
                (false, _) => Err("absent: VMs will use TCG software emulation (slow); enable virtualization in firmware or load kvm_intel/kvm_amd".into()),
            },
        ),
        Check::new(
            "image tools",
            hutch_image::check_host_tools()
                .map(|()| "debootstrap, apt, dpkg-deb, mkfs.ext4, keyring, root".into())
                .map_err(|e| crate::error::chain(&e)),
        ),
        Check::new(
            "guest agent",
            agent_bin::find(None).map(|p| p.display().to_string()).map_err(|e| e.to_string()),
        ),
    ];
    // Shares are optional too: only their own sandboxes need them.
    checks.push(Check::new("shares", host.shares.clone()));
    let bin = home.bin();
    checks.push(Check::new(
        "firecracker",
        vmm_version(hutch_vmm::firecracker::find_firecracker_or_in(&bin)).await,
    ));
    checks.push(Check::new(
        "jailer",
        vmm_version(hutch_vmm::firecracker::find_jailer_or_in(&bin)).await,
    ));
    match &image {
        Ok(img) => {
            checks.push(Check::new(
                "image default",
                Ok(format!("kernel {} {}", img.kernel_release, img.digest)),
            ));
            let report =
                hutch_vmm::probe_accel(&img.kernel, &img.initrd, &home.accel_cache()).await;
            let usable = format!(
                "{} ({}{})",
                report.accel,
                report.reason,
                if report.cached { ", cached" } else { "" }
            );
            let runs_guests = report.accel == hutch_vmm::Accel::Kvm;
            checks.push(Check::new("accelerator", Ok(usable)));
            checks.push(Check::new(
                "kvm guests",
                if runs_guests {
                    Ok("KVM runs guests: Firecracker VMs can boot".into())
                } else {
                    Err("KVM does not run guests here: Firecracker VMs cannot boot (QEMU falls back to TCG)".into())
                },
            ));
            let found = hutch_daemon::backend::Found::look(home, true);
            let (backend, why) = hutch_daemon::backend::describe_auto(&found, report.accel);
            checks.push(Check::new(
                "backend",
                Ok(format!("{backend} under --backend auto ({why})")),
            ));
        }
        Err(e) => {
            checks.push(Check::new("image default", Err(e.to_string())));
            checks.push(Check::new(
                "accelerator",
                Err(
                    "not probed: KVM is tested by booting the default image, build it first".into(),
                ),
            ));
            checks.push(Check::new(
                "backend",
                Err("--backend auto cannot choose before the accelerator is probed".into()),
            ));
        }
    }
    // Firecracker is optional (QEMU runs sandboxes without it): its lines inform, they don't
    // fail the report.
    for c in &checks {
        println!(
            "{:<4} {:<14} {}",
            if c.ok { "ok" } else { "MISS" },
            c.what,
            c.detail
        );
    }
    let can_run = host.qemu.is_ok() && image.is_ok();
    Ok(if can_run { 0 } else { 1 })
}

/// `<binary> --version` of a found firecracker or jailer, or how to get one.
async fn vmm_version(
    found: Result<std::path::PathBuf, hutch_vmm::firecracker::FirecrackerError>,
) -> Result<String, String> {
    let path = found.map_err(|e| {
        format!("{e}, or run `hutch setup firecracker` (optional: QEMU works without it)")
    })?;
    hutch_vmm::firecracker::binary_version(&path)
        .await
        .map(|v| format!("{v} ({})", path.display()))
        .map_err(|e| crate::error::chain(&e))
}
