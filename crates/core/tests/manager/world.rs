//! One fake host for a test: the fakes, a store, a manager over them, and the checks that a
//! sandbox left nothing behind.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use hutch_core::{Limits, Manager, ManagerConfig, Templates};
use hutch_protocol::{
    host::{Channel, ExecEvent},
    ExecRequest, ExitStatus,
};
use hutch_store::{SqliteStore, Store};
use hutch_testkit::{FailingStore, FailingVmm, FakeImages, FakeNetwork, FakeVmm};
use hutch_types::{NetworkPolicy, SandboxSpec, SandboxState};

/// A fake host and a manager ("the daemon") over it.
pub struct World {
    /// Holds the run dirs, the database, the snapshots.
    pub dir: tempfile::TempDir,
    /// The agent processes.
    pub vmm: Arc<FakeVmm>,
    /// `vmm`, failing where told.
    pub failing: Arc<FailingVmm>,
    /// The networks.
    pub net: Arc<FakeNetwork>,
    /// The store, failing where told.
    pub store: Arc<FailingStore>,
    /// The daemon.
    pub manager: Arc<Manager>,
}

impl World {
    /// A fresh host whose daemon has reconciled.
    pub async fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = SqliteStore::open(&dir.path().join("state.db")).unwrap();
        let store = Arc::new(FailingStore::new(Arc::new(sqlite)));
        let vmm = Arc::new(FakeVmm::new());
        let failing = Arc::new(FailingVmm::new(vmm.clone()));
        let net = Arc::new(FakeNetwork::new());
        let manager = manager(dir.path(), &store, &failing, &net);
        manager.reconcile().await.unwrap();
        World {
            dir,
            vmm,
            failing,
            net,
            store,
            manager,
        }
    }

    /// The daemon restarts: a new manager over the same host and store, reconciled.
    pub async fn restart(&mut self) -> hutch_core::ReconcileReport {
        self.manager = manager(self.dir.path(), &self.store, &self.failing, &self.net);
        self.manager.reconcile().await.unwrap()
    }

    /// Where the sandboxes' run dirs go.
    pub fn runs_dir(&self) -> PathBuf {
        self.dir.path().join("vms")
    }

    /// Asserts that the host holds nothing for any sandbox: no agent process, no run dir, no
    /// network, no recorded host object, no save.
    pub fn assert_nothing_left(&self) {
        assert_eq!(
            self.vmm.running(),
            Vec::<u32>::new(),
            "agent processes left"
        );
        assert_eq!(
            entries(&self.runs_dir()),
            Vec::<String>::new(),
            "run dirs left"
        );
        assert_eq!(self.net.networks(), Vec::<String>::new(), "networks left");
        assert_eq!(
            self.store.objects().unwrap(),
            vec![],
            "host objects still recorded"
        );
        let snapshots = self.dir.path().join("snapshots");
        assert_eq!(entries(&snapshots), Vec::<String>::new(), "saves left");
        let cas = self.dir.path().join("secrets/sandboxes");
        assert_eq!(entries(&cas), Vec::<String>::new(), "broker CAs left");
    }

    /// The recorded state of `id`.
    pub async fn state(&self, id: &str) -> SandboxState {
        self.manager.get(id).await.unwrap().state
    }

    /// The single sandbox recorded (for a create that failed and so returned no id).
    pub fn only_sandbox(&self) -> hutch_types::SandboxInfo {
        let all = self.store.list(&Default::default()).unwrap();
        assert_eq!(all.len(), 1, "{all:?}");
        all.into_iter().next().unwrap()
    }
}

fn manager(
    dir: &Path,
    store: &Arc<FailingStore>,
    vmm: &Arc<FailingVmm>,
    net: &Arc<FakeNetwork>,
) -> Arc<Manager> {
    let cfg = ManagerConfig {
        images: Arc::new(FakeImages::new(["default"])),
        runs_dir: dir.join("vms"),
        limits: Limits {
            max_sandboxes: 8,
            memory_budget_mib: 8 * 1024,
        },
        templates: Templates::new(dir.join("templates"), dir.join("shm")),
        snapshots_dir: dir.join("snapshots"),
        boot_timeout: Duration::from_secs(3),
        jails_dir: None,
        detached: true,
        secrets: Some(Arc::new(
            hutch_core::secrets::SecretStore::open(&dir.join("secrets")).unwrap(),
        )),
    };
    let net: Arc<dyn hutch_core::HostNetwork> = net.clone();
    Manager::new(cfg, store.clone(), vmm.clone(), Ok(net))
}

/// The names in `dir` (none if it does not exist).
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A small sandbox with `network`.
pub fn spec(network: NetworkPolicy) -> SandboxSpec {
    SandboxSpec {
        memory_mib: 128,
        network,
        ..SandboxSpec::default()
    }
}

/// Runs `script` with `sh -c`; its stdout and exit code.
pub async fn sh(channel: &Channel, script: &str) -> (String, ExitStatus) {
    let mut exec = channel.exec(ExecRequest::shell(script)).await.unwrap();
    let mut out = Vec::new();
    loop {
        match exec.next_event().await.unwrap() {
            ExecEvent::Stdout(d) => out.extend(d),
            ExecEvent::Stderr(_) => {}
            ExecEvent::Exited(info) => return (String::from_utf8(out).unwrap(), info.status),
        }
    }
}

/// A small template called `name` with a network.
pub fn template(name: &str) -> hutch_types::TemplateSpec {
    hutch_types::TemplateSpec {
        name: name.into(),
        image: "default".into(),
        cpus: 1,
        memory_mib: 128,
        disk_mib: 256,
        provision: Some("echo provisioned".into()),
        network: NetworkPolicy::Open,
    }
}

/// A sandbox cloned from template `name`.
pub fn clone_of(name: &str) -> SandboxSpec {
    SandboxSpec {
        template: Some(name.into()),
        ..spec(NetworkPolicy::Open)
    }
}

impl World {
    /// Waits (bounded) until template `name` has `ready` clones in its pool.
    pub async fn pool_ready(&self, name: &str, ready: u32) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.manager.template(name).unwrap().pool_ready != ready {
            assert!(
                std::time::Instant::now() < deadline,
                "pool never got {ready} ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
