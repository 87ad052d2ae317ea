//! [`SandboxApi`] on this host: the [`Manager`] and the task runner behind it.

use std::{future::Future, sync::Arc};

use async_trait::async_trait;
use hutch_net::{FlowEvent, PublishedPort};
use hutch_protocol::{host::Exec, ExecRequest, TtySize};
use hutch_store::ListFilter;
use hutch_task::{sign::SignatureCheck, Baseline, TaskRecord, TaskSpec};
use hutch_types::{ErrorCode, NetworkPolicy, SandboxId, SandboxInfo, TemplateInfo, TemplateSpec};
use tokio::io::DuplexStream;

use super::{
    transfer, ByteStream, Caller, Command, Create, Lifecycle, Result, SandboxApi, ServiceError,
};
use crate::{
    exec::{run_capped, Collected, OutputSink, OverCap},
    task::Tasks,
    Manager,
};

/// Why a label-scoped caller may not touch templates.
const TEMPLATES_HOST_WIDE: &str =
    "templates are host-wide: only an unscoped token may create or remove them";
/// Why a label-scoped caller may not touch tasks.
pub const TASKS_HOST_WIDE: &str =
    "tasks are host-wide: only an unscoped token may run or read them";

/// The request surface of a single host.
pub struct LocalApi {
    manager: Arc<Manager>,
    tasks: Arc<Tasks>,
}

impl LocalApi {
    /// The surface over `manager` and `tasks`.
    pub fn new(manager: Arc<Manager>, tasks: Arc<Tasks>) -> LocalApi {
        LocalApi { manager, tasks }
    }

    /// The manager underneath (for the daemon's own housekeeping: TTLs, pools, shutdown).
    pub fn manager(&self) -> &Arc<Manager> {
        &self.manager
    }

    /// A sandbox the caller may act on: not found if unknown, forbidden if out of scope.
    async fn authorize(&self, caller: &Caller, id: &SandboxId) -> Result<SandboxInfo> {
        let info = self.manager.get(id.as_str()).await?;
        caller.allows(&info)?;
        Ok(info)
    }

    /// The guest request for `command` in the sandbox `info`: its environment, then the
    /// command's own on top.
    fn exec_request(info: &SandboxInfo, command: Command, stdin: bool) -> Result<ExecRequest> {
        let Command {
            argv,
            env,
            cwd,
            timeout_secs,
        } = command;
        if argv.is_empty() || argv.iter().any(|a| a.contains('\0')) {
            return Err(ServiceError::refused(
                ErrorCode::BadRequest,
                "argv must be non-empty and free of NUL",
            ));
        }
        if let Some(bad) = env.keys().find(|k| !hutch_types::valid_env_name(k)) {
            return Err(ServiceError::refused(
                ErrorCode::BadRequest,
                format!("invalid variable name {bad:.40}"),
            ));
        }
        let mut merged = info.spec.env.clone();
        merged.extend(env);
        Ok(ExecRequest {
            env: merged.into_iter().collect(),
            cwd,
            stdin,
            timeout_ms: timeout_secs.map(|s| s.saturating_mul(1000)),
            ..ExecRequest::new(argv)
        })
    }

    /// The checked guest path and the channel to the sandbox's agent.
    async fn target(
        &self,
        caller: &Caller,
        id: &SandboxId,
        raw: &str,
    ) -> Result<(SandboxInfo, String, Arc<hutch_protocol::host::Channel>)> {
        let info = self.authorize(caller, id).await?;
        let path = transfer::guest_path(raw)?;
        let channel = self.manager.channel(id.as_str()).await?;
        Ok((info, path, channel))
    }
}

/// Runs a state-changing call to completion even if the caller goes away meanwhile, so a
/// disconnect never leaves a sandbox half created or half destroyed.
async fn completed<T, E>(
    call: impl Future<Output = std::result::Result<T, E>> + Send + 'static,
) -> Result<T>
where
    T: Send + 'static,
    E: Into<ServiceError> + Send + 'static,
{
    tokio::spawn(call)
        .await
        .map_err(|e| {
            ServiceError::refused(ErrorCode::Internal, format!("manager task failed: {e}"))
        })?
        .map_err(Into::into)
}

/// 404 for a name that cannot be a template's (and so never reaches the filesystem).
fn template_name(name: &str) -> Result<()> {
    if hutch_types::valid_name(name) {
        Ok(())
    } else {
        Err(ServiceError::refused(
            ErrorCode::NotFound,
            format!("no such template: {name:.40}"),
        ))
    }
}

#[async_trait]
impl SandboxApi for LocalApi {
    async fn create(&self, caller: &Caller, req: Create) -> Result<(SandboxInfo, bool)> {
        let Create {
            mut spec,
            idempotency_key,
        } = req;
        caller.label(&mut spec)?;
        let manager = self.manager.clone();
        let (info, created) =
            completed(async move { manager.create(spec, idempotency_key.as_deref()).await })
                .await?;
        caller.allows(&info)?;
        Ok((info.redacted(), created))
    }

    async fn list(&self, caller: &Caller, mut filter: ListFilter) -> Result<Vec<SandboxInfo>> {
        caller.narrow(&mut filter.labels);
        let all = self.manager.list(&filter).await?;
        Ok(all.into_iter().map(SandboxInfo::redacted).collect())
    }

    async fn get(&self, caller: &Caller, id: &SandboxId) -> Result<SandboxInfo> {
        self.authorize(caller, id).await?;
        Ok(self.manager.inspect(id.as_str()).await?.redacted())
    }

    async fn recorded(&self, caller: &Caller, id: &SandboxId) -> Result<SandboxInfo> {
        Ok(self.authorize(caller, id).await?.redacted())
    }

    async fn lifecycle(
        &self,
        caller: &Caller,
        id: &SandboxId,
        action: Lifecycle,
    ) -> Result<SandboxInfo> {
        self.authorize(caller, id).await?;
        let (manager, id) = (self.manager.clone(), id.to_string());
        let info = completed(async move {
            match action {
                Lifecycle::Pause => manager.pause(&id).await,
                Lifecycle::Resume => manager.resume(&id).await,
                Lifecycle::Suspend => manager.suspend(&id).await,
                Lifecycle::Start => manager.start(&id).await,
                Lifecycle::Stop => manager.stop(&id).await,
                Lifecycle::Destroy => manager.destroy(&id).await,
            }
        })
        .await?;
        Ok(info.redacted())
    }

    async fn set_ttl(
        &self,
        caller: &Caller,
        id: &SandboxId,
        ttl_secs: Option<u64>,
    ) -> Result<SandboxInfo> {
        self.authorize(caller, id).await?;
        let (manager, id) = (self.manager.clone(), id.to_string());
        let info = completed(async move { manager.set_ttl(&id, ttl_secs).await }).await?;
        Ok(info.redacted())
    }

    async fn console(&self, caller: &Caller, id: &SandboxId) -> Result<Vec<u8>> {
        self.authorize(caller, id).await?;
        Ok(self.manager.console_log(id.as_str()).await?)
    }

    async fn set_network(
        &self,
        caller: &Caller,
        id: &SandboxId,
        policy: NetworkPolicy,
    ) -> Result<SandboxInfo> {
        self.authorize(caller, id).await?;
        let (manager, id) = (self.manager.clone(), id.to_string());
        let info = completed(async move { manager.set_network(&id, policy).await }).await?;
        Ok(info.redacted())
    }

    async fn network_log(&self, caller: &Caller, id: &SandboxId) -> Result<Vec<FlowEvent>> {
        self.authorize(caller, id).await?;
        Ok(self.manager.network_events(id.as_str()).await?)
    }

    async fn publish_port(
        &self,
        caller: &Caller,
        id: &SandboxId,
        guest_port: u16,
        host_port: Option<u16>,
    ) -> Result<PublishedPort> {
        self.authorize(caller, id).await?;
        let (manager, id) = (self.manager.clone(), id.to_string());
        completed(async move { manager.publish_port(&id, guest_port, host_port).await }).await
    }

    async fn unpublish_port(
        &self,
        caller: &Caller,
        id: &SandboxId,
        guest_port: u16,
    ) -> Result<Vec<PublishedPort>> {
        self.authorize(caller, id).await?;
        let (manager, id) = (self.manager.clone(), id.to_string());
        completed(async move { manager.unpublish_port(&id, guest_port).await }).await
    }

    async fn ports(&self, caller: &Caller, id: &SandboxId) -> Result<Vec<PublishedPort>> {
        self.authorize(caller, id).await?;
        Ok(self.manager.published_ports(id.as_str()).await?)
    }

    async fn exec(
        &self,
        caller: &Caller,
        id: &SandboxId,
        command: Command,
        stdin: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<Collected> {
        let info = self.authorize(caller, id).await?;
        let channel = self.manager.channel(id.as_str()).await?;
        let req = Self::exec_request(&info, command, stdin.is_some())?;
        Ok(run_capped(&channel, req, stdin, limit, OverCap::Drop, None).await?)
    }

    async fn exec_stream(
        &self,
        caller: &Caller,
        id: &SandboxId,
        command: Command,
        tty: Option<TtySize>,
    ) -> Result<Exec> {
        let info = self.authorize(caller, id).await?;
        let channel = self.manager.channel(id.as_str()).await?;
        let mut req = Self::exec_request(&info, command, true)?;
        req.tty = tty;
        channel.exec(req).await.map_err(ServiceError::exec_start)
    }

    async fn write_file(
        &self,
        caller: &Caller,
        id: &SandboxId,
        path: &str,
        mode: u32,
        body: ByteStream,
    ) -> Result<()> {
        let (_, path, channel) = self.target(caller, id, path).await?;
        transfer::write_file(&channel, path, mode, body).await
    }

    async fn read_file(
        &self,
        caller: &Caller,
        id: &SandboxId,
        path: &str,
        sink: DuplexStream,
    ) -> Result<()> {
        let (_, path, channel) = self.target(caller, id, path).await?;
        transfer::read_file(&channel, path, sink).await
    }

    async fn put_archive(
        &self,
        caller: &Caller,
        id: &SandboxId,
        dir: &str,
        body: ByteStream,
    ) -> Result<()> {
        let (info, dir, channel) = self.target(caller, id, dir).await?;
        let unpack = Command {
            argv: transfer::unpack_argv(&dir),
            ..Command::default()
        };
        let req = Self::exec_request(&info, unpack, true)?;
        transfer::put_archive(&channel, req, body).await
    }

    async fn get_archive(
        &self,
        caller: &Caller,
        id: &SandboxId,
        dir: &str,
        sink: DuplexStream,
    ) -> Result<()> {
        let (info, dir, channel) = self.target(caller, id, dir).await?;
        let pack = Command {
            argv: transfer::pack_argv(&dir),
            ..Command::default()
        };
        let req = Self::exec_request(&info, pack, false)?;
        transfer::get_archive(&channel, req, dir, sink).await
    }

    async fn fork(&self, caller: &Caller, id: &SandboxId, count: u32) -> Result<Vec<SandboxInfo>> {
        self.authorize(caller, id).await?;
        let (manager, id) = (self.manager.clone(), id.to_string());
        let children = completed(async move { manager.fork(&id, count).await }).await?;
        Ok(children.into_iter().map(SandboxInfo::redacted).collect())
    }

    async fn create_template(&self, caller: &Caller, spec: TemplateSpec) -> Result<TemplateInfo> {
        caller.require_admin(TEMPLATES_HOST_WIDE)?;
        let manager = self.manager.clone();
        completed(async move { manager.create_template(spec).await }).await
    }

    async fn templates(&self, _caller: &Caller) -> Result<Vec<TemplateInfo>> {
        Ok(self.manager.templates()?)
    }

    async fn template(&self, _caller: &Caller, name: &str) -> Result<TemplateInfo> {
        template_name(name)?;
        Ok(self.manager.template(name)?)
    }

    async fn remove_template(&self, caller: &Caller, name: &str) -> Result<TemplateInfo> {
        caller.require_admin(TEMPLATES_HOST_WIDE)?;
        template_name(name)?;
        let (manager, name) = (self.manager.clone(), name.to_string());
        completed(async move { manager.remove_template(&name).await }).await
    }

    async fn set_pool(&self, caller: &Caller, name: &str, size: u32) -> Result<TemplateInfo> {
        caller.require_admin(TEMPLATES_HOST_WIDE)?;
        template_name(name)?;
        let (manager, name) = (self.manager.clone(), name.to_string());
        completed(async move { manager.set_pool_size(&name, size).await }).await
    }

    async fn run_task(
        &self,
        caller: &Caller,
        spec: TaskSpec,
        workspace: Vec<u8>,
        sink: Option<OutputSink>,
    ) -> Result<TaskRecord> {
        caller.require_admin(TASKS_HOST_WIDE)?;
        let tasks = self.tasks.clone();
        // Runs to its end even if the caller goes away, so no sandbox is left behind.
        completed(async move { tasks.run(spec, workspace, sink).await }).await
    }

    async fn tasks(&self, caller: &Caller) -> Result<Vec<TaskRecord>> {
        caller.require_admin(TASKS_HOST_WIDE)?;
        Ok(self.tasks.list().await?)
    }

    async fn task(&self, caller: &Caller, id: &str) -> Result<TaskRecord> {
        caller.require_admin(TASKS_HOST_WIDE)?;
        Ok(self.tasks.get(id).await?)
    }

    async fn task_baseline(&self, caller: &Caller, id: &str) -> Result<Baseline> {
        caller.require_admin(TASKS_HOST_WIDE)?;
        Ok(self.tasks.baseline(id).await?)
    }

    async fn task_changeset(&self, caller: &Caller, id: &str) -> Result<Vec<u8>> {
        caller.require_admin(TASKS_HOST_WIDE)?;
        Ok(self.tasks.changeset(id).await?)
    }

    async fn task_diff(&self, caller: &Caller, id: &str) -> Result<String> {
        caller.require_admin(TASKS_HOST_WIDE)?;
        Ok(self.tasks.diff(id).await?)
    }

    async fn task_signature(&self, caller: &Caller, id: &str) -> Result<SignatureCheck> {
        caller.require_admin(TASKS_HOST_WIDE)?;
        Ok(self.tasks.verify_signature(id).await?)
    }
}
