//! [`FakeVmm`]: the real guest agent as a host process instead of a VM.

use std::{
    fs::File,
    os::{
        fd::OwnedFd,
        unix::{fs::DirBuilderExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use async_trait::async_trait;
use hutch_vmm::{
    Accel, BootFiles, Lifetime, Nic, Snapshot, SnapshotMemory, Vm, VmSpec, Vmm, VmmError,
};
use rustix::process::{kill_process, Pid, Signal};
use serde::{Deserialize, Serialize};

use crate::proc::{running, stat};

/// The name of the fake backend ([`Vmm::name`], [`Snapshot::backend`]).
pub const BACKEND: &str = "fake";

/// The agent's listening socket in a fake VM's run dir: the host end of its guest channel.
const SOCKET: &str = "agent.sock";
/// The record [`Vmm::adopt`] reads (named as the real backends name theirs, so that core's
/// orphan sweep finds fake VMs too).
const IDENTITY: &str = "identity.json";
/// How long a stop or continue signal may take to show in `/proc`.
const SIGNAL_WAIT: Duration = Duration::from_secs(2);

/// The agent's identity socket in a fake VM's run dir (`HUTCH_IDENTITY_SOCKET` for it).
pub const IDENTITY_SOCKET: &str = "identity.sock";

/// A [`Vmm`] whose "VMs" are `hutch-agent --listen-fd` processes serving a Unix socket in the
/// run dir, so everything core does through the guest channel (handshake, setup, exec, files,
/// shutdown) runs against the real agent, in milliseconds.
///
/// What differs from a VM: the agent runs on the host as the test's user (commands and file
/// paths are the host's: use temporary directories); pausing stops the agent process
/// (`SIGSTOP`), not what it started; a NIC is accepted and only recorded; an owned VM dies
/// when its handle or the [`FakeVmm`] drops, not when the test process is killed. A snapshot
/// is a record of the VM's shape; a restore starts a fresh agent (stopped, as a restored VM
/// comes back paused) — the guest's processes and files are not carried over.
///
/// The `FakeVmm` plays the host: a [`Manager`](hutch_core::Manager) dropped without destroying
/// its sandboxes leaves their detached VMs running for the next one to adopt, while dropping
/// the `FakeVmm` kills every process it started, so a failed test leaves nothing behind.
#[derive(Debug)]
pub struct FakeVmm {
    agent: PathBuf,
    /// Every agent process started, by pid and start time.
    started: Mutex<Vec<(u32, u64)>>,
}

/// What a fake VM's run dir records about it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Identity {
    id: String,
    pid: u32,
    start_time: u64,
    cpus: u8,
    memory_mib: u32,
    nic_mac: Option<[u8; 6]>,
    boot: BootFiles,
}

impl Default for FakeVmm {
    fn default() -> Self {
        FakeVmm::new()
    }
}

impl FakeVmm {
    /// A fake VMM running the agent from [`crate::agent_binary`].
    pub fn new() -> FakeVmm {
        FakeVmm::with_agent(crate::agent_binary())
    }

    /// A fake VMM running the agent binary `agent`.
    pub fn with_agent(agent: PathBuf) -> FakeVmm {
        FakeVmm {
            agent,
            started: Mutex::new(Vec::new()),
        }
    }

    /// The pids of the agent processes this VMM started that still run: empty once every VM
    /// was destroyed.
    pub fn running(&self) -> Vec<u32> {
        let started = self.started.lock().expect("started lock");
        started
            .iter()
            .filter(|(pid, start)| running(*pid, *start).is_some())
            .map(|(pid, _)| *pid)
            .collect()
    }

    /// Starts an agent for `spec` (with a NIC of MAC `nic_mac`): creates the run dir, binds the
    /// channel socket, spawns the agent on it and records it. On error nothing is left.
    fn spawn(&self, spec: &VmSpec, nic_mac: Option<[u8; 6]>) -> Result<FakeVm, VmmError> {
        hutch_vmm::validate_id(&spec.id)?;
        if spec.cpus == 0 || spec.memory_mib < 64 {
            return Err(VmmError::InvalidSpec(
                "cpus >= 1 and memory >= 64 MiB".into(),
            ));
        }
        let dir = &spec.run_dir;
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io("create parent of", parent, e))?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(VmmError::RunDirExists(dir.clone()))
            }
            Err(e) => return Err(io("create run dir", dir, e)),
        }
        let vm = self.spawn_in(spec, nic_mac);
        if vm.is_err() {
            let _ = std::fs::remove_dir_all(dir);
        }
        vm
    }

    fn spawn_in(&self, spec: &VmSpec, nic_mac: Option<[u8; 6]>) -> Result<FakeVm, VmmError> {
        let dir = &spec.run_dir;
        let sock = dir.join(SOCKET);
        let listener =
            std::os::unix::net::UnixListener::bind(&sock).map_err(|e| io("bind", &sock, e))?;
        let console_path = dir.join("console.log");
        let console = File::create(&console_path).map_err(|e| io("create", &console_path, e))?;
        let console2 = console
            .try_clone()
            .map_err(|e| io("dup", &console_path, e))?;
        // The listening socket is the agent's stdin: `--listen-fd 0`, no descriptor juggling.
        // Guest processes ask for identity tokens on a socket of this "VM"'s own.
        let child = Command::new(&self.agent)
            .args(["--listen-fd", "0"])
            .env("HUTCH_IDENTITY_SOCKET", dir.join(IDENTITY_SOCKET))
            .stdin(Stdio::from(OwnedFd::from(listener)))
            .stdout(console)
            .stderr(console2)
            .process_group(0)
            .spawn()
            .map_err(|e| io("spawn", &self.agent, e))?;
        let pid = child.id();
        // Not waited for here: `destroy` reaps it (by pid and start time), as after an adopt.
        drop(child);
        let Some(s) = stat(pid) else {
            return Err(VmmError::NotRunning(spec.id.clone()));
        };
        self.started
            .lock()
            .expect("started lock")
            .push((pid, s.start_time));
        let identity = Identity {
            id: spec.id.clone(),
            pid,
            start_time: s.start_time,
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            nic_mac,
            boot: BootFiles::of(spec),
        };
        let vm = FakeVm::new(identity, spec.lifetime, dir.clone());
        let path = dir.join(IDENTITY);
        let json = serde_json::to_vec(&vm.identity).expect("identity serializes");
        std::fs::write(&path, json).map_err(|e| io("write", &path, e))?;
        Ok(vm)
    }
}

impl Drop for FakeVmm {
    fn drop(&mut self) {
        let started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        for (pid, start) in started.iter() {
            let _ = hutch_vmm::kill_recorded(*pid, *start);
        }
    }
}

#[async_trait]
impl Vmm for FakeVmm {
    fn name(&self) -> &'static str {
        BACKEND
    }

    async fn start(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, VmmError> {
        Ok(Box::new(self.spawn(spec, None)?))
    }

    async fn start_with_nic(
        &self,
        spec: &VmSpec,
        nic: Option<&Nic>,
    ) -> Result<Box<dyn Vm>, VmmError> {
        Ok(Box::new(self.spawn(spec, nic.map(|n| n.mac))?))
    }

    async fn adopt(&self, id: &str, run_dir: &Path) -> Result<Box<dyn Vm>, VmmError> {
        hutch_vmm::validate_id(id)?;
        let gone = |why: String| VmmError::Gone {
            id: id.to_string(),
            run_dir: run_dir.to_path_buf(),
            why,
        };
        let bytes = std::fs::read(run_dir.join(IDENTITY)).map_err(|e| gone(e.to_string()))?;
        let identity: Identity =
            serde_json::from_slice(&bytes).map_err(|e| gone(format!("unreadable record: {e}")))?;
        if identity.id != id {
            return Err(gone(format!("the record names VM {:?}", identity.id)));
        }
        if running(identity.pid, identity.start_time).is_none() {
            // Reaps it if it is an exited child of ours.
            let _ = hutch_vmm::kill_recorded(identity.pid, identity.start_time);
            return Err(gone(format!("pid {} has exited", identity.pid)));
        }
        Ok(Box::new(FakeVm::new(
            identity,
            Lifetime::Detached,
            run_dir.to_path_buf(),
        )))
    }

    async fn restore(
        &self,
        spec: &VmSpec,
        nic: Option<&Nic>,
        snapshot: &Snapshot,
    ) -> Result<Box<dyn Vm>, VmmError> {
        let mismatch = |what: &str| {
            Err(VmmError::InvalidSpec(format!(
                "the snapshot's {what} differs from the spec's"
            )))
        };
        if snapshot.backend != BACKEND {
            return mismatch("backend");
        }
        if (snapshot.cpus, snapshot.memory_mib) != (spec.cpus, spec.memory_mib) {
            return mismatch("vCPUs or memory");
        }
        if snapshot.nic_mac != nic.map(|n| n.mac) {
            return mismatch("NIC");
        }
        if snapshot
            .boot
            .as_ref()
            .is_some_and(|b| *b != BootFiles::of(spec))
        {
            return mismatch("boot files");
        }
        let vm = self.spawn(spec, snapshot.nic_mac)?;
        // A restored VM comes back paused.
        if let Err(e) = vm.signal(Signal::STOP, true).await {
            let _ = Box::new(vm).destroy().await;
            return Err(e);
        }
        Ok(Box::new(vm))
    }
}

/// One fake VM: an agent process and its run dir.
#[derive(Debug)]
pub struct FakeVm {
    identity: Identity,
    lifetime: Lifetime,
    run_dir: PathBuf,
    console: PathBuf,
    /// Set once destroyed, so that `Drop` has nothing left to do.
    done: bool,
}

impl FakeVm {
    fn new(identity: Identity, lifetime: Lifetime, run_dir: PathBuf) -> FakeVm {
        FakeVm {
            console: run_dir.join("console.log"),
            identity,
            lifetime,
            run_dir,
            done: false,
        }
    }

    /// Sends `signal` to the agent process, if it is still the recorded one, and waits until
    /// it is stopped (`stopped`) or not.
    async fn signal(&self, signal: Signal, stopped: bool) -> Result<(), VmmError> {
        let (pid, start) = (self.identity.pid, self.identity.start_time);
        let not_running = || VmmError::NotRunning(self.identity.id.clone());
        running(pid, start).ok_or_else(not_running)?;
        let raw = i32::try_from(pid)
            .ok()
            .and_then(Pid::from_raw)
            .ok_or_else(not_running)?;
        kill_process(raw, signal).map_err(|e| io("signal", &self.run_dir, e.into()))?;
        let deadline = Instant::now() + SIGNAL_WAIT;
        loop {
            let s = running(pid, start).ok_or_else(not_running)?;
            if (s.state == 'T') == stopped {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(VmmError::InvalidSpec(format!(
                    "pid {pid} did not change state after {signal:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Kills the agent (by pid and start time, waiting for it) and removes the run dir.
    fn kill_and_remove(&self) -> Result<(), VmmError> {
        hutch_vmm::kill_recorded(self.identity.pid, self.identity.start_time)?;
        match std::fs::remove_dir_all(&self.run_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io("remove run dir", &self.run_dir, e))
            }
            _ => Ok(()),
        }
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        if !self.done && self.lifetime == Lifetime::Owned {
            let _ = self.kill_and_remove();
        }
    }
}

#[async_trait]
impl Vm for FakeVm {
    fn id(&self) -> &str {
        &self.identity.id
    }

    fn pid(&self) -> u32 {
        self.identity.pid
    }

    fn start_time(&self) -> u64 {
        self.identity.start_time
    }

    fn accel(&self) -> Accel {
        Accel::Tcg
    }

    fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    fn console_log(&self) -> &Path {
        &self.console
    }

    fn has_exited(&self) -> bool {
        running(self.identity.pid, self.identity.start_time).is_none()
    }

    async fn connect_channel(&self) -> Result<tokio::net::UnixStream, VmmError> {
        let path = self.run_dir.join(SOCKET);
        tokio::net::UnixStream::connect(&path)
            .await
            .map_err(|source| VmmError::Connect { path, source })
    }

    async fn pause(&self) -> Result<(), VmmError> {
        self.signal(Signal::STOP, true).await
    }

    async fn resume(&self) -> Result<(), VmmError> {
        self.signal(Signal::CONT, false).await
    }

    async fn is_paused(&self) -> Result<bool, VmmError> {
        running(self.identity.pid, self.identity.start_time)
            .map(|s| s.state == 'T')
            .ok_or_else(|| VmmError::NotRunning(self.identity.id.clone()))
    }

    async fn snapshot(&self, dir: &Path) -> Result<Snapshot, VmmError> {
        if !self.is_paused().await? {
            return Err(VmmError::InvalidSpec(
                "only a paused VM can be saved".into(),
            ));
        }
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io("create parent of", parent, e))?;
        }
        std::fs::create_dir(dir).map_err(|e| io("create snapshot dir", dir, e))?;
        let saved = save(&self.identity, dir);
        if saved.is_err() {
            let _ = std::fs::remove_dir_all(dir);
        }
        saved
    }

    async fn destroy(mut self: Box<Self>) -> Result<(), VmmError> {
        self.done = true;
        let vm = *self;
        tokio::task::spawn_blocking(move || vm.kill_and_remove())
            .await
            .expect("kill task panicked")
    }
}

/// Writes a fake VM's snapshot files into `dir`: a state unique to this save (templates are
/// addressed by its digest), an empty disk and the record.
fn save(identity: &Identity, dir: &Path) -> Result<Snapshot, VmmError> {
    let snapshot = Snapshot {
        backend: BACKEND.into(),
        dir: dir.to_path_buf(),
        memory: SnapshotMemory::InState,
        cpus: identity.cpus,
        memory_mib: identity.memory_mib,
        nic_mac: identity.nic_mac,
        disk_format: None,
        boot: Some(identity.boot.clone()),
    };
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let state = format!("fake VM {} saved at {nanos}", identity.id);
    let record = serde_json::to_vec(&snapshot).expect("snapshot serializes");
    for (path, bytes) in [
        (snapshot.state_file(), state.as_bytes()),
        (snapshot.disk_file(), &[][..]),
        (dir.join(Snapshot::RECORD), &record[..]),
    ] {
        std::fs::write(&path, bytes).map_err(|e| io("write", &path, e))?;
    }
    Ok(snapshot)
}

/// [`VmmError::Io`].
fn io(op: &'static str, path: &Path, source: std::io::Error) -> VmmError {
    VmmError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}
