//! Boot options for sandboxes this process owns (`hutch run --local`, the benchmarks): the
//! image, the backend the daemon would choose, and the VM shape from the command line.

use std::{sync::Arc, time::Duration};

use hutch_core::BootOptions;
use hutch_daemon::Home;
use hutch_vmm::{AccelReport, Vmm};

use crate::{args::VmArgs, error::CliError};

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
pub async fn prepare(home: &Home, vm: &VmArgs) -> Result<Launcher, CliError> {
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
    };
    Ok(Launcher {
        vmm: backend.vmm,
        accel: backend.accel,
        options,
    })
}

/// A private, in-process host for `hutch run --local`: the daemon's request surface over a
/// manager whose state lives in a temporary directory and whose VMs die with this process.
pub struct InProcess {
    /// The request surface.
    pub api: hutch_core::service::LocalApi,
    /// The manager's state (store, templates, saves), removed when this goes.
    _state: tempfile::TempDir,
}

/// Opens the image `vm` names, picks the backend as the daemon would and builds an
/// [`InProcess`] host for one sandbox of that shape.
pub async fn in_process(home: &Home, vm: &VmArgs) -> Result<InProcess, CliError> {
    let image = hutch_image::open(&home.images(), &vm.image)?;
    let backend = hutch_daemon::backend::choose(home, &image, &vm.vmm).await?;
    let state = tempfile::Builder::new()
        .prefix("hutch-run-")
        .tempdir()
        .map_err(|source| CliError::Workdir {
            path: std::env::temp_dir(),
            source,
        })?;
    let store: Arc<dyn hutch_store::Store> = Arc::new(
        hutch_store::SqliteStore::open(&state.path().join("state.db")).map_err(CliError::Store)?,
    );
    let cfg = hutch_core::ManagerConfig {
        images: Arc::new(hutch_core::ImageDir::new(home.images())),
        runs_dir: home.local_vms(),
        limits: hutch_core::Limits {
            max_sandboxes: 1,
            memory_budget_mib: u64::from(vm.memory),
        },
        templates: hutch_core::Templates::new(
            state.path().join("templates"),
            state.path().join("shm"),
        ),
        snapshots_dir: state.path().join("snapshots"),
        boot_timeout: Duration::from_secs(vm.boot_timeout),
        jails_dir: Some(home.jails()),
        detached: false,
    };
    let no_network = Err("`hutch run` in process has no sandbox network".to_string());
    let manager = hutch_core::Manager::new(cfg, store, backend.vmm, no_network);
    let tasks = Arc::new(hutch_core::task::Tasks::new(
        state.path().join("tasks"),
        manager.clone(),
    ));
    Ok(InProcess {
        api: hutch_core::service::LocalApi::new(manager, tasks),
        _state: state,
    })
}
