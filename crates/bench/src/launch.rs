//! Boot options for sandboxes a benchmark owns: the image, the backend the daemon would choose,
//! and the VM shape from the command line.

use std::{sync::Arc, time::Duration};

use hutch_core::BootOptions;
use hutch_daemon::{Home, VmArgs};
use hutch_vmm::{AccelReport, Vmm};

use crate::error::BenchError;

/// Everything needed to boot sandboxes of one shape.
pub struct Launcher {
    /// The backend.
    pub vmm: Arc<dyn Vmm>,
    /// The probed accelerator and why.
    pub accel: AccelReport,
    /// Boot options; callers set a fresh `id` per sandbox.
    pub options: BootOptions,
}

/// Opens the image, picks the backend (cached accelerator probe) and prepares boot options.
pub async fn prepare(home: &Home, vm: &VmArgs) -> Result<Launcher, BenchError> {
    let image = hutch_image::open(&home.images(), &vm.image)?;
    let backend = hutch_daemon::backend::choose(home, &image, &vm.vmm).await?;
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
        memory: hutch_vmm::GuestMemory::Anonymous,
        shares: Vec::new(),
    };
    Ok(Launcher {
        vmm: backend.vmm,
        accel: backend.accel,
        options,
    })
}
