//! `hutch run --local`'s private host: the image, the backend the daemon would choose, and a
//! manager behind the daemon's request surface.

use std::{sync::Arc, time::Duration};

use hutch_daemon::Home;

use hutch_daemon::VmArgs;

use crate::error::CliError;

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
        // Secrets need the daemon's broker, in the sandbox's network: none in process.
        secrets: None,
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
