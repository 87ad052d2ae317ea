//! The sandbox manager: admission, lifecycle, health, TTLs and reconciliation.
//!
//! Every front end (HTTP daemon, tests) drives sandboxes through [`Manager`]; it alone decides
//! which action is legal in which state ([`crate::lifecycle`]), and it records every host
//! object in the [`Store`] before creating it, so [`Manager::reconcile`] can adopt or remove
//! whatever a killed daemon left behind. Store calls go through an [`AsyncStore`], off the
//! async workers, each awaited before the step it records.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use hutch_image::ImageError;
use hutch_net::{FlowEvent, NetError, WireGuardConfig};
use hutch_protocol::host::{Channel, ChannelError};
use hutch_store::{AsyncStore, HostObject, ListFilter, ObjectKind, Store, StoreError};
use hutch_types::{ErrorCode, NetworkPolicy, SandboxInfo, SandboxSpec, SandboxState, SpecError};
use hutch_vmm::{GuestMemory, Snapshot, VmShare, Vmm, VmmError};

use crate::{
    blocking::{off_worker, remove_tree},
    host::{HostNetwork, ImageSource},
    lifecycle::{check, ActionKind, IllegalAction},
    metrics::CreatePath,
    network,
    sandbox::{BootOptions, Sandbox, SandboxError},
    template::{TemplateError, Templates},
};

/// How long a health-check ping may take before the sandbox counts as unresponsive.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// Host-wide admission limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most sandboxes alive at once (creating, running or paused).
    pub max_sandboxes: usize,
    /// Most guest memory, in MiB, summed over live sandboxes.
    pub memory_budget_mib: u64,
}

/// Where the manager keeps things and how it boots.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Where images are found by name (an [`ImageDir`](crate::ImageDir) in the daemon).
    pub images: Arc<dyn ImageSource>,
    /// Parent of every sandbox's run dir.
    pub runs_dir: PathBuf,
    /// Admission limits.
    pub limits: Limits,
    /// Saved templates.
    pub templates: Templates,
    /// Where forks and sandboxes paused to disk keep their snapshots.
    pub snapshots_dir: PathBuf,
    /// How long a boot may take.
    pub boot_timeout: Duration,
    /// Where a jailed backend keeps its VMs' chroots (`<dir>/<exec>/<id>/root`), so that a
    /// restart finds and removes those no sandbox owns; `None` when nothing runs jailed.
    pub jails_dir: Option<PathBuf>,
    /// Whether VMs outlive this process: the daemon's do (its successor adopts them); those
    /// of an in-process manager (`hutch run --local`) die with it.
    pub detached: bool,
    /// The host's secrets (`$HUTCH_HOME/secrets`); `None`: sandboxes cannot have secrets.
    pub secrets: Option<Arc<crate::secrets::SecretStore>>,
}

/// Why a manager action failed. [`CoreError::code`] gives the stable API category.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The spec breaks a bound.
    #[error(transparent)]
    InvalidSpec(#[from] SpecError),
    /// No such sandbox.
    #[error("no such sandbox: {0}")]
    NotFound(String),
    /// The image is missing or unreadable.
    #[error("image unavailable")]
    Image(#[source] ImageError),
    /// The action is not legal in the sandbox's state.
    #[error(transparent)]
    Illegal(#[from] IllegalAction),
    /// Admission refused the sandbox.
    #[error("over capacity: {0}")]
    OverCapacity(String),
    /// The state store failed.
    #[error("state store failed")]
    Store(#[from] StoreError),
    /// Booting or stopping the VM failed.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The guest channel failed.
    #[error("guest channel failed")]
    Channel(#[from] ChannelError),
    /// The VMM failed.
    #[error("vmm failed")]
    Vmm(#[from] VmmError),
    /// The sandbox asks for a network this host cannot give.
    #[error("networking is unavailable on this host: {0}")]
    NoNetwork(String),
    /// A template operation failed.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// The host network failed.
    #[error("sandbox network failed")]
    Net(#[from] NetError),
    /// A secret could not be attached, or the sandbox's broker CA not made.
    #[error(transparent)]
    Secret(#[from] crate::secrets::SecretError),
    /// A recorded run dir could not be removed.
    #[error("cannot remove run dir {path}")]
    RemoveDir {
        /// The directory.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl CoreError {
    /// The stable API category of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            CoreError::InvalidSpec(_) => ErrorCode::InvalidSpec,
            CoreError::NotFound(_) => ErrorCode::NotFound,
            CoreError::Image(ImageError::NotFound { .. }) => ErrorCode::NotFound,
            CoreError::Illegal(_) => ErrorCode::Conflict,
            CoreError::Template(TemplateError::NotFound(_)) => ErrorCode::NotFound,
            CoreError::Template(
                TemplateError::Exists(_)
                | TemplateError::InUse { .. }
                | TemplateError::ImageChanged { .. },
            ) => ErrorCode::Conflict,
            CoreError::Template(TemplateError::Provision { .. }) => ErrorCode::ExecFailed,
            CoreError::OverCapacity(_) => ErrorCode::OverCapacity,
            CoreError::Secret(e) => e.code(),
            CoreError::NoNetwork(_) => ErrorCode::Conflict,
            CoreError::Net(
                NetError::PortInUse(_) | NetError::AlreadyPublished { .. } | NetError::NoNic(_),
            ) => ErrorCode::Conflict,
            CoreError::Channel(ChannelError::Remote(_)) => ErrorCode::ExecFailed,
            CoreError::Channel(ChannelError::Timeout(_)) => ErrorCode::Timeout,
            _ => ErrorCode::Internal,
        }
    }
}

/// What [`Manager::reconcile`] found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Sandboxes whose VMs were running and are managed again.
    pub adopted: Vec<String>,
    /// Sandboxes marked failed because their VM was gone or mid-creation.
    pub failed: Vec<String>,
    /// VMM processes killed because no sandbox owns them any more.
    pub killed_processes: usize,
    /// Run dirs removed because no sandbox owns them any more.
    pub removed_dirs: usize,
    /// Sandbox networks removed because no sandbox owns them any more.
    pub removed_networks: usize,
    /// Saves (forks, pauses to disk) removed because no sandbox uses them any more.
    pub removed_snapshots: usize,
}

/// The network a sandbox is about to get.
pub(crate) struct NetPlan {
    pub(crate) net: Arc<dyn HostNetwork>,
    pub(crate) policy: hutch_net::Policy,
    pub(crate) tunnel: Option<WireGuardConfig>,
}

/// A sandbox with a VM under this daemon's control.
pub(crate) struct Live {
    pub(crate) sandbox: tokio::sync::Mutex<Option<Sandbox>>,
    channel: Arc<Channel>,
}

/// Drives every sandbox on this host.
pub struct Manager {
    pub(crate) cfg: ManagerConfig,
    store: AsyncStore,
    pub(crate) vmm: Arc<dyn Vmm>,
    /// Sandbox networking, or why this host cannot offer it.
    net: Result<Arc<dyn HostNetwork>, String>,
    live: Mutex<HashMap<String, Arc<Live>>>,
    pub(crate) admission: tokio::sync::Mutex<()>,
    /// Ready clones of templates.
    pub(crate) pools: crate::pool::Pools,
    /// This manager, for background tasks it starts (pool refills).
    pub(crate) me: std::sync::Weak<Manager>,
    /// The secret brokers of live sandboxes with secrets.
    pub(crate) brokers: crate::secrets::Brokers,
    /// Signs guests' workload identity tokens, once the daemon set it.
    identity: std::sync::OnceLock<Arc<crate::identity::Issuer>>,
    /// Where what the guest sets off goes into its journal (when journals are kept).
    guest_feed: std::sync::OnceLock<Arc<crate::audit::GuestFeed>>,
    /// Counters and histograms for `/metrics`.
    metrics: Arc<crate::metrics::Metrics>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Manager {
    /// A manager over `store` and `vmm`. Call [`Manager::reconcile`] before serving. The
    /// store gets a thread of its own ([`AsyncStore`]): the manager never calls it on an async
    /// worker.
    pub fn new(
        cfg: ManagerConfig,
        store: Arc<dyn Store>,
        vmm: Arc<dyn Vmm>,
        net: Result<Arc<dyn HostNetwork>, String>,
    ) -> Arc<Manager> {
        Arc::new_cyclic(|me| Manager {
            cfg,
            store: AsyncStore::new(store),
            vmm,
            net,
            live: Mutex::new(HashMap::new()),
            admission: tokio::sync::Mutex::new(()),
            pools: crate::pool::Pools::default(),
            me: me.clone(),
            brokers: Default::default(),
            identity: std::sync::OnceLock::new(),
            guest_feed: std::sync::OnceLock::new(),
            metrics: Arc::default(),
        })
    }

    /// Answers guests' token requests with `issuer` from now on (sandboxes that go live
    /// afterwards; the daemon sets it before it reconciles). Set once; later calls are ignored.
    pub fn set_identity(&self, issuer: Arc<crate::identity::Issuer>) {
        let _ = self.identity.set(issuer);
    }

    /// The workload identity issuer, if this manager has one.
    pub fn identity(&self) -> Option<&Arc<crate::identity::Issuer>> {
        self.identity.get()
    }

    /// Journals what guests set off (broker decisions, identity tokens) through `feed` from now
    /// on. Set once; later calls are ignored.
    pub fn set_guest_feed(&self, feed: Arc<crate::audit::GuestFeed>) {
        let _ = self.guest_feed.set(feed);
    }

    /// Where what guests set off is journalled, if anywhere.
    pub fn guest_feed(&self) -> Option<&Arc<crate::audit::GuestFeed>> {
        self.guest_feed.get()
    }

    /// The daemon's metrics (handles for the features that count into them).
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// The image called `name`.
    pub(crate) fn image(&self, name: &str) -> Result<hutch_image::Image, CoreError> {
        self.cfg.images.open(name).map_err(CoreError::Image)
    }

    fn run_dir(&self, id: &str) -> PathBuf {
        self.cfg.runs_dir.join(id)
    }

    /// The host network, or why this host has none (for `network.rs`).
    pub(crate) fn net(&self) -> Result<&Arc<dyn HostNetwork>, CoreError> {
        self.net
            .as_ref()
            .map_err(|why| CoreError::NoNetwork(why.clone()))
    }

    /// The state store, for async callers: the manager's modules, and front ends that keep
    /// more in it (API tokens), so that one thread owns the database.
    pub fn store(&self) -> &AsyncStore {
        &self.store
    }

    /// Takes a sandbox out of the live table (its VM is about to go).
    pub(crate) fn take_live(&self, id: &str) -> Option<Arc<Live>> {
        self.live.lock().expect("live lock").remove(id)
    }

    pub(crate) fn live(&self, id: &str) -> Option<Arc<Live>> {
        self.live.lock().expect("live lock").get(id).cloned()
    }

    /// Creates a sandbox and returns once it is running. With an `idempotency_key` that was
    /// used before, returns that sandbox instead (`false`: nothing new was created).
    pub async fn create(
        &self,
        spec: SandboxSpec,
        idempotency_key: Option<&str>,
    ) -> Result<(SandboxInfo, bool), CoreError> {
        if spec.origin.is_some() {
            return Err(SpecError(
                "origin is set by Hutch (templates and forks), not by clients".into(),
            )
            .into());
        }
        let started = std::time::Instant::now();
        let mut spec = spec;
        self.give_placeholders(&mut spec)?;
        let snapshot = match spec.template.clone() {
            Some(name) => Some(self.template_snapshot(&mut spec, &name).await?),
            None => None,
        };
        spec.validate()?;
        self.check_shares(&mut spec).await?;
        let plan = self.plan_network(&spec, snapshot.as_ref())?;
        if let Some(key) = idempotency_key {
            if let Some(existing) = self.store.by_idempotency_key(key).await? {
                return Ok((self.info(&existing).await?, false));
            }
        }
        if let Some(info) = self
            .take_pooled(&spec, idempotency_key, plan.as_ref())
            .await?
        {
            self.metrics.created(CreatePath::Pool, started.elapsed());
            return Ok((info, true));
        }
        let image = self.image(&spec.image)?;
        let id = crate::new_id();
        {
            let _admit = self.admission.lock().await;
            self.admit(&spec).await?;
            let (id, created) = self
                .store
                .insert_sandbox(&id, &spec, idempotency_key, now_ms())
                .await?;
            if !created {
                return Ok((self.info(&id).await?, false));
            }
        }
        let path = match snapshot {
            Some(_) => CreatePath::Restore,
            None => CreatePath::Cold,
        };
        if let Err(e) = self
            .launch(&id, &spec, image, plan, snapshot.as_ref())
            .await
        {
            self.metrics.create_failed();
            return Err(e);
        }
        self.metrics.created(path, started.elapsed());
        Ok((self.info(&id).await?, true))
    }

    /// Refuses shares the backend cannot serve, and makes each share's host directory
    /// canonical (symlinks resolved once, by the admin's path; the guest never names it) and
    /// checks that it is a directory.
    async fn check_shares(&self, spec: &mut SandboxSpec) -> Result<(), CoreError> {
        if spec.shares.is_empty() {
            return Ok(());
        }
        if !self.vmm.supports_shares() {
            let why = hutch_vmm::VmmError::NoShares {
                backend: self.vmm.name(),
            };
            return Err(SpecError(why.to_string()).into());
        }
        let dirs: Vec<String> = spec.shares.iter().map(|s| s.host_dir.clone()).collect();
        let canonical = off_worker(move || {
            dirs.iter()
                .map(|d| match std::fs::canonicalize(d) {
                    Ok(c) if c.is_dir() => c
                        .to_str()
                        .map(str::to_string)
                        .ok_or_else(|| format!("share {d}: its real path is not UTF-8")),
                    Ok(_) => Err(format!("share {d} is not a directory")),
                    Err(e) => Err(format!("share {d}: {e}")),
                })
                .collect::<Result<Vec<String>, String>>()
        })
        .await
        .map_err(SpecError)?;
        for (share, dir) in spec.shares.iter_mut().zip(canonical) {
            share.host_dir = dir;
        }
        spec.validate()?;
        Ok(())
    }

    /// Records that a sandbox's run dir (and network) are about to be created.
    pub(crate) async fn intend(&self, id: &str, network: bool) -> Result<(), CoreError> {
        self.store
            .intend_object(&self.run_dir_object(id, false))
            .await?;
        if network {
            self.store.intend_object(&netns_object(id, false)).await?;
        }
        Ok(())
    }

    /// The host network and policy a sandbox gets, `None` for no NIC. A sandbox restored from a
    /// snapshot has a NIC exactly when the snapshot's guest had one (with policy `none` its
    /// network reaches nothing).
    pub(crate) fn plan_network(
        &self,
        spec: &SandboxSpec,
        snapshot: Option<&Snapshot>,
    ) -> Result<Option<NetPlan>, CoreError> {
        let nic = match snapshot {
            Some(snap) if snap.nic_mac.is_none() && spec.network.has_nic() => {
                return Err(SpecError(
                    "its snapshot's guest has no NIC (made on a host without networking), so it cannot have a network".into(),
                )
                .into())
            }
            Some(snap) => snap.nic_mac.is_some(),
            None => spec.network.has_nic(),
        };
        if !nic {
            return Ok(None);
        }
        let policy = network::nic_policy(&spec.network)?;
        let tunnel = network::to_tunnel(spec)?;
        let net = self
            .net
            .as_ref()
            .map_err(|why| CoreError::NoNetwork(why.clone()))?;
        Ok(Some(NetPlan {
            net: net.clone(),
            policy,
            tunnel,
        }))
    }

    /// Creates a sandbox's network and VM (booted, or restored from `snapshot`); on failure removes the network again.
    pub(crate) async fn start_vm(
        &self,
        id: &str,
        spec: &SandboxSpec,
        image: hutch_image::Image,
        plan: Option<&NetPlan>,
        snapshot: Option<&Snapshot>,
    ) -> Result<Sandbox, CoreError> {
        let network = match plan {
            Some(p) => {
                network::attach(&p.net, self.vmm.as_ref(), id, &p.policy, p.tunnel.as_ref()).await?
            }
            None => None,
        };
        let opts = BootOptions {
            id: id.to_string(),
            image,
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            disk_mib: spec.disk_mib,
            runs_dir: self.cfg.runs_dir.clone(),
            boot_timeout: self.cfg.boot_timeout,
            detached: self.cfg.detached,
            network,
            memory: GuestMemory::Anonymous,
            shares: boot_shares(spec),
        };
        let vmm = self.vmm.as_ref();
        let started = match snapshot {
            Some(snap) => Sandbox::restore(vmm, &opts, snap).await,
            None => Sandbox::boot(vmm, &opts).await,
        };
        if started.is_err() {
            if let Some(p) = plan {
                let _ = p.net.destroy(id).await;
            }
        }
        Ok(started?)
    }

    /// Records the intent, then creates the network and the VM of a recorded sandbox (booted,
    /// or restored from `snapshot`) and makes it live; on any failure (the store's included)
    /// removes what was made and marks it failed.
    pub(crate) async fn launch(
        &self,
        id: &str,
        spec: &SandboxSpec,
        image: hutch_image::Image,
        plan: Option<NetPlan>,
        snapshot: Option<&Snapshot>,
    ) -> Result<(), CoreError> {
        let launched = async {
            self.intend(id, plan.is_some()).await?;
            let sandbox = self
                .start_vm(id, spec, image, plan.as_ref(), snapshot)
                .await?;
            let armed = async {
                self.arm(id, spec, &sandbox).await?;
                self.start_checked_broker(id, spec, &sandbox).await
            };
            if let Err(e) = armed.await {
                self.stop_broker(id);
                let _ = sandbox.discard().await;
                return Err(e);
            }
            if plan.is_some() {
                if let Err(e) = self.store.confirm_object(&netns_object(id, true)).await {
                    let _ = sandbox.discard().await;
                    return Err(e.into());
                }
            }
            self.record_running(id, sandbox).await
        };
        match launched.await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.remove_recorded(id).await?;
                self.store
                    .set_state(id, &SandboxState::Failed(chain(&e)), now_ms())
                    .await?;
                Err(e)
            }
        }
    }

    /// Changes a sandbox's egress policy; the next connection (and DNS query) follows it.
    pub async fn set_network(
        &self,
        id: &str,
        policy: NetworkPolicy,
    ) -> Result<SandboxInfo, CoreError> {
        let mut info = self.info(id).await?;
        check(&info.state, ActionKind::Network)?;
        let host_policy = network::to_policy(&policy)?;
        if !info.spec.network.has_nic() {
            return Err(CoreError::Illegal(IllegalAction {
                action: "change the network of",
                state: "created without a network",
            }));
        }
        let net = self
            .net
            .as_ref()
            .map_err(|why| CoreError::NoNetwork(why.clone()))?;
        net.set_policy(id, &host_policy).await?;
        info.spec.network = policy;
        self.store.set_spec(id, &info.spec, now_ms()).await?;
        self.info(id).await
    }

    /// Replaces a sandbox's TTL: it is destroyed `ttl_secs` from now (never with `None`).
    pub async fn set_ttl(&self, id: &str, ttl_secs: Option<u64>) -> Result<SandboxInfo, CoreError> {
        let info = self.info(id).await?;
        check(&info.state, ActionKind::Expire)?;
        let max = hutch_types::bounds::MAX_TTL_SECS;
        if ttl_secs.is_some_and(|t| t == 0 || t > max) {
            return Err(SpecError(format!("ttl_secs must be 1..={max}")).into());
        }
        let now = now_ms();
        let expires = ttl_secs.map(|t| now.saturating_add((t as i64).saturating_mul(1000)));
        self.store.set_expiry(id, expires, now).await?;
        self.info(id).await
    }

    /// The sandbox's recent network decisions (allowed and denied flows, DNS answers).
    pub async fn network_events(&self, id: &str) -> Result<Vec<FlowEvent>, CoreError> {
        self.info(id).await?;
        Ok(match &self.net {
            Ok(net) => net.events(id, SystemTime::UNIX_EPOCH),
            Err(_) => Vec::new(),
        })
    }

    /// Refuses a spec that would exceed the host's limits.
    pub(crate) async fn admit(&self, spec: &SandboxSpec) -> Result<(), CoreError> {
        let active: Vec<SandboxInfo> = self
            .store
            .list(&ListFilter::default())
            .await?
            .into_iter()
            .filter(|s| {
                matches!(
                    s.state,
                    SandboxState::Creating | SandboxState::Running | SandboxState::Paused
                )
            })
            .collect();
        let limits = self.cfg.limits;
        if active.len() >= limits.max_sandboxes {
            return Err(CoreError::OverCapacity(format!(
                "{} sandboxes are live, the limit is {}",
                active.len(),
                limits.max_sandboxes
            )));
        }
        let used: u64 = active
            .iter()
            .map(|s| u64::from(s.spec.memory_mib))
            .sum::<u64>()
            + self.pools.memory_mib();
        if used + u64::from(spec.memory_mib) > limits.memory_budget_mib {
            return Err(CoreError::OverCapacity(format!(
                "{} MiB asked, {} of {} MiB memory budget in use",
                spec.memory_mib, used, limits.memory_budget_mib
            )));
        }
        Ok(())
    }

    /// The VM's processes: the VMM, then its helpers (a share's virtiofsd).
    fn process_objects(id: &str, vm: &dyn hutch_vmm::Vm) -> Vec<HostObject> {
        std::iter::once((vm.pid(), vm.start_time()))
            .chain(vm.helpers())
            .map(|(pid, start)| HostObject {
                sandbox_id: id.to_string(),
                kind: ObjectKind::VmProcess,
                name: pid.to_string(),
                detail: start.to_string(),
                confirmed: true,
            })
            .collect()
    }

    fn run_dir_object(&self, id: &str, confirmed: bool) -> HostObject {
        HostObject {
            sandbox_id: id.to_string(),
            kind: ObjectKind::RunDir,
            name: self.run_dir(id).display().to_string(),
            detail: String::new(),
            confirmed,
        }
    }

    /// Records a booted (or adopted) sandbox's objects and makes it live and running. If the
    /// store fails, the VM is discarded (a detached VM's handle would leave it running,
    /// perhaps unrecorded) and the caller removes what is recorded.
    pub(crate) async fn record_running(&self, id: &str, sandbox: Sandbox) -> Result<(), CoreError> {
        let mut recorded = self
            .store
            .confirm_object(&self.run_dir_object(id, true))
            .await;
        for process in Self::process_objects(id, sandbox.vm()) {
            if recorded.is_ok() {
                recorded = self.store.confirm_object(&process).await;
            }
        }
        if let Err(e) = recorded {
            let _ = sandbox.discard().await;
            return Err(e.into());
        }
        if let Some(issuer) = self.identity.get() {
            sandbox
                .channel()
                .serve_tokens(Arc::new(crate::identity::SandboxTokens {
                    manager: self.me.clone(),
                    issuer: issuer.clone(),
                    id: id.to_string(),
                }));
        }
        sandbox
            .channel()
            .serve_ssh_agent(Arc::new(crate::secrets::SandboxSshAgent {
                manager: self.me.clone(),
                id: id.to_string(),
            }));
        let live = Arc::new(Live {
            channel: sandbox.channel().clone(),
            sandbox: tokio::sync::Mutex::new(Some(sandbox)),
        });
        self.live
            .lock()
            .expect("live lock")
            .insert(id.to_string(), live);
        if let Err(e) = self
            .store
            .set_state(id, &SandboxState::Running, now_ms())
            .await
        {
            if let Some(live) = self.take_live(id) {
                if let Some(sandbox) = live.sandbox.lock().await.take() {
                    let _ = sandbox.discard().await;
                }
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// One sandbox as recorded (no health check; see [`Manager::inspect`]).
    pub async fn get(&self, id: &str) -> Result<SandboxInfo, CoreError> {
        self.info(id).await
    }

    pub(crate) async fn info(&self, id: &str) -> Result<SandboxInfo, CoreError> {
        self.store
            .get(id)
            .await?
            .ok_or_else(|| CoreError::NotFound(id.to_string()))
    }

    /// One sandbox, its state confirmed by a health check.
    pub async fn inspect(&self, id: &str) -> Result<SandboxInfo, CoreError> {
        let info = self.info(id).await?;
        self.checked(info).await
    }

    /// Sandboxes matching `filter`, each running one confirmed by a health check.
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<SandboxInfo>, CoreError> {
        let infos = self.store.list(filter).await?;
        let checks = infos.into_iter().map(|i| self.checked(i));
        let checked = futures::future::join_all(checks).await;
        checked.into_iter().collect()
    }

    /// Replaces a stored `running`/`paused` with `failed` when the VM does not answer.
    async fn checked(&self, info: SandboxInfo) -> Result<SandboxInfo, CoreError> {
        if !matches!(info.state, SandboxState::Running | SandboxState::Paused) {
            return Ok(info);
        }
        let verdict = match self.live(&info.id) {
            None => Some("not managed by this daemon".to_string()),
            Some(live) => health(&live, &info.state).await,
        };
        match verdict {
            None => Ok(info),
            Some(reason) => {
                if let Some(live) = self.live(&info.id) {
                    // Its guest will not answer: end what waits on it now, not at a deadline.
                    live.channel.abort(&format!("the sandbox failed: {reason}"));
                }
                self.store
                    .set_state(&info.id, &SandboxState::Failed(reason), now_ms())
                    .await?;
                self.info(&info.id).await
            }
        }
    }

    /// The channel to a running sandbox's agent, for exec and file operations.
    pub async fn channel(&self, id: &str) -> Result<Arc<Channel>, CoreError> {
        let info = self.info(id).await?;
        check(&info.state, ActionKind::Use)?;
        self.live(id)
            .map(|l| l.channel.clone())
            .ok_or_else(|| CoreError::NotFound(id.to_string()))
    }

    /// Freezes a running sandbox; its processes keep their state.
    pub async fn pause(&self, id: &str) -> Result<SandboxInfo, CoreError> {
        self.transition(id, ActionKind::Pause, SandboxState::Paused)
            .await
    }

    /// Thaws a paused sandbox, or restores one paused to disk.
    pub async fn resume(&self, id: &str) -> Result<SandboxInfo, CoreError> {
        if self.info(id).await?.state == SandboxState::Suspended {
            return self.resume_from_disk(id).await;
        }
        self.transition(id, ActionKind::Resume, SandboxState::Running)
            .await
    }

    async fn transition(
        &self,
        id: &str,
        action: ActionKind,
        to: SandboxState,
    ) -> Result<SandboxInfo, CoreError> {
        let info = self.info(id).await?;
        check(&info.state, action)?;
        let live = self
            .live(id)
            .ok_or_else(|| CoreError::NotFound(id.to_string()))?;
        let guard = live.sandbox.lock().await;
        let sandbox = guard
            .as_ref()
            .ok_or_else(|| CoreError::NotFound(id.to_string()))?;
        match action {
            ActionKind::Pause => sandbox.vm().pause().await?,
            _ => sandbox.vm().resume().await?,
        }
        self.store.set_state(id, &to, now_ms()).await?;
        self.info(id).await
    }

    /// Powers a sandbox off; its record stays (state `stopped`).
    pub async fn stop(&self, id: &str) -> Result<SandboxInfo, CoreError> {
        self.teardown(id, ActionKind::Stop, SandboxState::Stopped)
            .await
    }

    /// Boots a stopped sandbox again from its image, with its spec, id and labels: a cold
    /// boot on a fresh disk (a stopped sandbox's disk went with its VM). A restored sandbox
    /// (template clone or fork) cannot boot again: its snapshot was released when it stopped.
    pub async fn start(&self, id: &str) -> Result<SandboxInfo, CoreError> {
        let spec = self.info(id).await?.spec;
        if spec.origin.is_some() {
            return Err(CoreError::Illegal(IllegalAction {
                action: "start",
                state: "restored from a snapshot (create a new one instead)",
            }));
        }
        let plan = self.plan_network(&spec, None)?;
        let image = self.image(&spec.image)?;
        {
            let _admit = self.admission.lock().await;
            // Checked under the admission lock, so two starts cannot both boot it.
            check(&self.info(id).await?.state, ActionKind::Start)?;
            self.admit(&spec).await?;
            self.store
                .set_state(id, &SandboxState::Creating, now_ms())
                .await?;
        }
        self.launch(id, &spec, image, plan, None).await?;
        self.info(id).await
    }

    /// Removes a sandbox and everything it owns on the host.
    pub async fn destroy(&self, id: &str) -> Result<SandboxInfo, CoreError> {
        self.teardown(id, ActionKind::Destroy, SandboxState::Destroyed)
            .await
    }

    async fn teardown(
        &self,
        id: &str,
        action: ActionKind,
        to: SandboxState,
    ) -> Result<SandboxInfo, CoreError> {
        let info = self.info(id).await?;
        check(&info.state, action)?;
        if action == ActionKind::Stop {
            self.store
                .set_state(id, &SandboxState::Stopping, now_ms())
                .await?;
        }
        if let Some(live) = self.take_live(id) {
            if let Some(sandbox) = live.sandbox.lock().await.take() {
                if let Err(e) = sandbox.destroy().await {
                    tracing::warn!(%id, error = %chain(&e), "VM teardown failed; removing by record");
                }
            }
        }
        if let Err(e) = self.remove_recorded(id).await {
            // Its VM is gone, not all of what it owned: failed (a destroy may be retried),
            // not `running` or `stopping`.
            let why = format!("teardown incomplete: {}", chain(&e));
            self.store
                .set_state(id, &SandboxState::Failed(why), now_ms())
                .await?;
            return Err(e);
        }
        self.store.set_state(id, &to, now_ms()).await?;
        if action == ActionKind::Destroy {
            self.forget_secrets(id).await;
        }
        self.release_snapshots(&info).await;
        self.info(id).await
    }

    /// Removes every recorded host object of `id` (by exact pid + start time, by path).
    pub(crate) async fn remove_recorded(&self, id: &str) -> Result<usize, CoreError> {
        // Its sockets live in the sandbox's namespace: they go before the network.
        self.stop_broker(id);
        let mut removed = 0;
        for obj in self
            .store
            .objects()
            .await?
            .into_iter()
            .filter(|o| o.sandbox_id == id)
        {
            match obj.kind {
                ObjectKind::VmProcess => {
                    if let (Ok(pid), Ok(start)) = (obj.name.parse(), obj.detail.parse()) {
                        // Waits (bounded) for the process to die: keep it off async workers.
                        let killed =
                            off_worker(move || hutch_vmm::kill_recorded(pid, start)).await?;
                        removed += usize::from(killed);
                    }
                }
                ObjectKind::Netns => {
                    if let Ok(net) = &self.net {
                        net.destroy(&obj.sandbox_id).await?;
                        removed += 1;
                    }
                }
                ObjectKind::Port => {
                    // Normally closed already with the network above.
                    if let (Ok(net), Ok(port)) = (&self.net, obj.name.parse()) {
                        removed += usize::from(net.unpublish(id, port).await.unwrap_or(false));
                    }
                }
                ObjectKind::RunDir => {
                    if Path::new(&obj.name).exists() {
                        remove_tree(&obj.name)
                            .await
                            .map_err(|source| CoreError::RemoveDir {
                                path: obj.name.clone(),
                                source,
                            })?;
                        removed += 1;
                    }
                }
            }
            self.store.forget_object(id, obj.kind, &obj.name).await?;
        }
        Ok(removed)
    }

    /// The console log of a sandbox (guest-controlled text, size-capped by the VMM).
    pub async fn console_log(&self, id: &str) -> Result<Vec<u8>, CoreError> {
        let info = self.info(id).await?;
        check(&info.state, ActionKind::Console)?;
        let path = self.run_dir(id).join("console.log");
        Ok(tokio::fs::read(path).await.unwrap_or_default())
    }

    /// Destroys every sandbox whose TTL has passed; returns their ids.
    pub async fn expire_due(&self) -> Result<Vec<String>, CoreError> {
        let due = self.store.expired(now_ms()).await?;
        for id in &due {
            tracing::info!(%id, "TTL expired; destroying");
            if let Err(e) = self.destroy(id).await {
                tracing::warn!(%id, error = %chain(&e), "TTL destroy failed");
            }
        }
        Ok(due)
    }

    /// After a (re)start: adopts sandboxes whose VMs still run, fails the rest, and removes
    /// every VMM process and run dir that no sandbox owns.
    pub async fn reconcile(&self) -> Result<ReconcileReport, CoreError> {
        let mut report = ReconcileReport::default();
        let templates = self.cfg.templates.clone();
        off_worker(move || templates.remove_staging()).await;
        // Suspended sandboxes have nothing running: their snapshots wait on disk for a resume.
        let recorded: Vec<SandboxInfo> = self
            .store
            .list(&ListFilter::default())
            .await?
            .into_iter()
            .filter(|i| i.state != SandboxState::Suspended)
            .collect();
        // All at once: each adoption waits on its own guest's agent.
        let outcomes = futures::future::join_all(recorded.iter().map(|info| async move {
            if matches!(info.state, SandboxState::Running | SandboxState::Paused) {
                self.adopt(info).await
            } else {
                Err(format!(
                    "interrupted while {} by a daemon restart",
                    info.state.name()
                ))
            }
        }))
        .await;
        for (info, outcome) in recorded.iter().zip(outcomes) {
            match outcome {
                Ok(()) => report.adopted.push(info.id.clone()),
                Err(reason) => {
                    self.remove_recorded(&info.id).await?;
                    if !matches!(info.state, SandboxState::Stopped | SandboxState::Failed(_)) {
                        self.store
                            .set_state(&info.id, &SandboxState::Failed(reason), now_ms())
                            .await?;
                        report.failed.push(info.id.clone());
                    }
                }
            }
        }
        let owned: Vec<String> = self
            .live
            .lock()
            .expect("live lock")
            .keys()
            .cloned()
            .collect();
        let (killed, removed) = {
            let (runs, jails, owned) = (
                self.cfg.runs_dir.clone(),
                self.cfg.jails_dir.clone(),
                owned.clone(),
            );
            // Killing waits for each process to die: keep it off the async workers.
            off_worker(move || {
                use hutch_vmm::orphans::{
                    kill_unowned_vmms, remove_unowned_dirs, remove_unowned_jails,
                };
                let killed = kill_unowned_vmms(&runs, &owned);
                let removed = remove_unowned_dirs(&runs, &owned)
                    + jails.map_or(0, |j| remove_unowned_jails(&j, &owned));
                (killed, removed)
            })
            .await
        };
        report.killed_processes = killed;
        report.removed_dirs = removed;
        report.removed_snapshots = self.sweep_snapshots().await?;
        if let Some(secrets) = self.cfg.secrets.clone() {
            // Broker CAs of sandboxes destroyed (or never recorded) while no daemon ran.
            let keep: Vec<String> = self
                .store
                .list(&ListFilter::default())
                .await?
                .into_iter()
                .filter(|i| i.state != SandboxState::Destroyed)
                .map(|i| i.id)
                .collect();
            off_worker(move || secrets.sweep_sandboxes(&keep)).await;
        }
        if let Ok(net) = &self.net {
            let mut stray: Vec<String> = net
                .list_owned()
                .await?
                .iter()
                .filter_map(|o| o.sandbox_id())
                .filter(|id| !owned.iter().any(|o| o == id))
                .map(str::to_string)
                .collect();
            stray.sort();
            stray.dedup();
            for id in stray {
                tracing::warn!(%id, "removing a sandbox network no sandbox owns");
                net.destroy(&id).await?;
                report.removed_networks += 1;
            }
        }
        Ok(report)
    }

    /// Re-attaches to a sandbox's VM after a restart and restores its recorded state.
    async fn adopt(&self, info: &SandboxInfo) -> Result<(), String> {
        let vm = self
            .vmm
            .adopt(&info.id, &self.run_dir(&info.id))
            .await
            .map_err(|e| format!("VM lost across a daemon restart: {}", chain(&e)))?;
        let paused = info.state == SandboxState::Paused;
        // Running for the handshake; a VM recorded running may also be frozen, by a crash
        // during a fork's or a pause to disk's save.
        if vm.is_paused().await.map_err(|e| chain(&e))? {
            vm.resume().await.map_err(|e| chain(&e))?;
        }
        let sandbox = Sandbox::attach(&info.id, vm, self.cfg.boot_timeout)
            .await
            .map_err(|e| format!("agent lost across a daemon restart: {}", chain(&e)))?;
        network::adopt(self, info).await?;
        // A new listener in the same namespace: the old daemon's went with it.
        self.start_broker(&info.id, &info.spec)
            .await
            .map_err(|e| chain(&e))?;
        if paused {
            sandbox.vm().pause().await.map_err(|e| chain(&e))?;
        }
        self.record_running(&info.id, sandbox)
            .await
            .map_err(|e| chain(&e))?;
        if paused {
            self.store
                .set_state(&info.id, &SandboxState::Paused, now_ms())
                .await
                .map_err(|e| chain(&e))?;
        }
        Ok(())
    }
}

/// The record of a sandbox's network (named by the sandbox id).
pub(crate) fn netns_object(id: &str, confirmed: bool) -> HostObject {
    HostObject {
        sandbox_id: id.to_string(),
        kind: ObjectKind::Netns,
        name: id.to_string(),
        detail: String::new(),
        confirmed,
    }
}

/// `None` when healthy, else why not.
async fn health(live: &Live, state: &SandboxState) -> Option<String> {
    let guard = live.sandbox.lock().await;
    let sandbox = guard.as_ref()?;
    if sandbox.vm().has_exited() {
        return Some("the VM exited".into());
    }
    if *state == SandboxState::Paused {
        return None;
    }
    match tokio::time::timeout(HEALTH_TIMEOUT, live.channel.ping(now_ms() as u64)).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("agent unreachable: {}", chain(&e))),
        Err(_) => Some(format!("agent did not answer within {HEALTH_TIMEOUT:?}")),
    }
}

/// `error: cause: cause` on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        src = s.source();
    }
    out
}

/// The shares of `spec` as its VM boots with them, tagged `hutch-share-<n>`.
fn boot_shares(spec: &SandboxSpec) -> Vec<crate::BootShare> {
    spec.shares
        .iter()
        .enumerate()
        .map(|(i, s)| crate::BootShare {
            share: VmShare {
                tag: format!("hutch-share-{i}"),
                host_dir: s.host_dir.clone().into(),
                writable: s.writable,
            },
            guest_dir: s.guest_dir.clone(),
        })
        .collect()
}
