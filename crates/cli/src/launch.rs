//! Turning VM flags into a backend and boot options: image lookup and accelerator choice.

use std::time::Duration;

use hutch_core::BootOptions;
use hutch_vmm::{AccelReport, QemuVmm};

use crate::{args::VmArgs, error::CliError, home::Home};

/// Everything needed to boot sandboxes of one shape.
pub struct Launcher {
    /// The backend, set to the probed accelerator.
    pub vmm: QemuVmm,
    /// Why that accelerator.
    pub accel: AccelReport,
    /// Boot options; callers set a fresh `id` per sandbox.
    pub options: BootOptions,
}

/// The QEMU backend with the accelerator probed by booting `image`'s kernel (cached).
async fn probed(
    home: &Home,
    image: &hutch_image::Image,
) -> Result<(QemuVmm, AccelReport), CliError> {
    let accel = hutch_vmm::probe_accel(&image.kernel, &image.initrd, &home.accel_cache()).await;
    tracing::info!(accel = %accel.accel, reason = %accel.reason, "accelerator chosen");
    Ok((QemuVmm::new(accel.accel)?, accel))
}

/// The backend for the daemon, probed with the image `name` (which must exist).
pub async fn backend(home: &Home, name: &str) -> Result<QemuVmm, CliError> {
    let image = hutch_image::open(&home.images(), name)?;
    Ok(probed(home, &image).await?.0)
}

/// Opens the image, decides the accelerator (cached probe) and prepares boot options.
pub async fn prepare(home: &Home, vm: &VmArgs) -> Result<Launcher, CliError> {
    let image = hutch_image::open(&home.images(), &vm.image)?;
    let (vmm, accel) = probed(home, &image).await?;
    let options = BootOptions {
        id: hutch_core::new_id(),
        image,
        cpus: vm.cpus,
        memory_mib: vm.memory,
        disk_mib: vm.disk,
        runs_dir: home.local_vms(),
        boot_timeout: Duration::from_secs(vm.boot_timeout),
        detached: false,
        network: None,
    };
    Ok(Launcher {
        vmm,
        accel,
        options,
    })
}
