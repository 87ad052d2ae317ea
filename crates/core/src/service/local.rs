//! [`SandboxApi`] on this host: the [`Manager`] and the task runner behind it.

use std::{collections::BTreeMap, future::Future, sync::Arc};

use async_trait::async_trait;
use hutch_journal::{attr, kinds, AuditLog, Event, Journal, Report};
use hutch_net::{FlowEvent, PublishedPort};
use hutch_protocol::{ExecRequest, TtySize};
use hutch_store::ListFilter;
use hutch_task::{attest::Envelope, sign::SignatureCheck, Baseline, TaskRecord, TaskSpec};
use hutch_types::{
    BrokerEvent, ErrorCode, NetworkPolicy, SandboxId, SandboxInfo, SandboxState, SecretInfo,
    TemplateInfo, TemplateSpec,
};
use tokio::io::DuplexStream;

use super::{
    transfer, ByteStream, Caller, Command, Create, ExecStream, Lifecycle, Result, SandboxApi,
    ServiceError,
};
use crate::{
    audit::{create_event, AuditQuery, ExecTap, Journals, Tally},
    blocking::off_worker,
    exec::{run_capped_observed, Collected, OutputSink, OverCap},
    metrics::ExecKind,
    recording::Recording,
    secrets::{SecretError, SecretStore, SetSecret},
    task::Tasks,
    CoreError, Manager,
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
    journals: Option<Arc<Journals>>,
}

impl LocalApi {
    /// The surface over `manager` and `tasks`.
    pub fn new(manager: Arc<Manager>, tasks: Arc<Tasks>) -> LocalApi {
        LocalApi {
            manager,
            tasks,
            journals: None,
        }
    }

    /// The same surface, recording every sandbox's actions in its journal in `journals`
    /// (tasks' sandboxes too), with every value of the host's secret store redacted.
    pub fn with_journals(mut self, journals: Arc<Journals>) -> LocalApi {
        if let Some(store) = self.manager.secrets() {
            journals.redact(store.values());
        }
        self.tasks.set_journals(journals.clone());
        self.journals = Some(journals);
        self
    }

    /// The journals, when kept (for the daemon's housekeeping: TTL seals, retention).
    pub fn journals(&self) -> Option<&Arc<Journals>> {
        self.journals.as_ref()
    }

    /// The open journal of the sandbox `info`: none when journals are not kept, or sealed.
    async fn journal(&self, info: &SandboxInfo) -> Option<Journal> {
        match &self.journals {
            Some(j) => j.journal(&info.id, Some(info)).await,
            None => None,
        }
    }

    /// Appends `event`, asked by `caller`, to the journal of the sandbox `info`.
    async fn note(&self, caller: &Caller, info: &SandboxInfo, event: Event) {
        if let Some(j) = self.journal(info).await {
            j.append(event.by(Some(&caller.actor)));
        }
    }

    /// The journal tap of an exec of the sandbox `info` (`operation`), recording its session:
    /// none when journals are not kept, or sealed.
    async fn exec_tap(
        &self,
        caller: &Caller,
        info: &SandboxInfo,
        operation: &str,
        req: &ExecRequest,
        env: &BTreeMap<String, String>,
    ) -> Option<ExecTap> {
        let journals = self.journals.as_ref()?;
        journals
            .exec_tap(info, Some(&caller.actor), operation, req, env)
            .await
    }

    /// The journals, or not found when this host keeps none.
    fn journals_or_404(&self) -> Result<&Arc<Journals>> {
        self.journals.as_ref().ok_or_else(|| {
            ServiceError::refused(ErrorCode::NotFound, "this host keeps no journals")
        })
    }

    /// Runs the state change `call` to completion (as [`completed`]), recording `event` with
    /// its outcome in the journal of the sandbox `info`.
    async fn change<T, F>(
        &self,
        caller: &Caller,
        info: SandboxInfo,
        event: Event,
        call: F,
    ) -> Result<T>
    where
        T: Send + 'static,
        F: Future<Output = std::result::Result<T, crate::CoreError>> + Send + 'static,
    {
        let journals = self.journals.clone();
        let event = event.by(Some(&caller.actor));
        completed(async move {
            let result = call.await.map_err(ServiceError::from);
            if let Some(j) = journals {
                if let Some(j) = j.journal(&info.id, Some(&info)).await {
                    j.append(outcome(event, &result));
                }
            }
            result
        })
        .await
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

    /// The host's secret store, or why there is none.
    fn secret_store(&self) -> Result<&Arc<SecretStore>> {
        self.manager
            .secrets()
            .ok_or_else(|| ServiceError::refused(ErrorCode::Conflict, "this host keeps no secrets"))
    }

    /// Refuses attaching a secret the caller may not see (the manager refuses unknown ones).
    fn check_secret_scope(&self, caller: &Caller, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        let store = self.secret_store()?;
        for name in names {
            match store.get(&caller.scope, name) {
                Ok(_) => {}
                Err(SecretError::NotFound(_)) => {
                    return Err(ServiceError::refused(
                        ErrorCode::BadRequest,
                        format!("no such secret: {name}"),
                    ))
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The guest request for `command` in the sandbox `info`: the CA variables and each
    /// secret's placeholder when it has secrets, its environment, then the command's own on
    /// top.
    fn exec_request(
        &self,
        info: &SandboxInfo,
        command: Command,
        stdin: bool,
    ) -> Result<ExecRequest> {
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
        Ok(ExecRequest {
            env: self.manager.exec_env(&info.spec, env),
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

/// `event` with how `result` ended: `hutch.outcome` `ok` or the error code, and the message.
fn outcome<T>(event: Event, result: &Result<T>) -> Event {
    match result {
        Ok(_) => event.attr(attr::OUTCOME, "ok"),
        Err(e) => event
            .attr(
                attr::OUTCOME,
                serde_json::to_value(e.code()).unwrap_or_default(),
            )
            .attr(attr::ERROR_MESSAGE, e.to_string()),
    }
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

/// Why a scoped token may not read the metrics.
const METRICS_HOST_WIDE: &str = "metrics describe the whole host: admin tokens only";

impl LocalApi {
    /// The identity issuer, or `not_found` where this host issues no tokens.
    fn issuer(&self) -> Result<&Arc<crate::identity::Issuer>> {
        self.manager.identity().ok_or_else(|| {
            ServiceError::refused(ErrorCode::NotFound, "this host issues no identity tokens")
        })
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
        self.check_secret_scope(caller, &spec.secrets)?;
        if !spec.shares.is_empty() {
            caller.require_admin("shared folders expose host directories: admin tokens only")?;
        }
        let (manager, journals) = (self.manager.clone(), self.journals.clone());
        let actor = caller.actor.clone();
        let (info, created) = completed(async move {
            let (info, created) = manager.create(spec, idempotency_key.as_deref()).await?;
            if let (Some(j), true) = (&journals, created) {
                let digest = manager.image(&info.spec.image).ok().map(|i| i.digest);
                j.start(&info, create_event(&info, Some(&actor), digest.as_deref()))
                    .await;
            }
            Ok::<_, crate::CoreError>((info, created))
        })
        .await?;
        caller.allows(&info)?;
        if !created {
            let repeat = Event::new("api.create").attr("hutch.idempotent_repeat", true);
            self.note(caller, &info, repeat).await;
        }
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
        let info = self.authorize(caller, id).await?;
        let (manager, id) = (self.manager.clone(), id.to_string());
        let (journals, actor) = (self.journals.clone(), caller.actor.clone());
        let info = completed(async move {
            let result = match action {
                Lifecycle::Pause => manager.pause(&id).await,
                Lifecycle::Resume => manager.resume(&id).await,
                Lifecycle::Suspend => manager.suspend(&id).await,
                Lifecycle::Start => manager.start(&id).await,
                Lifecycle::Stop => manager.stop(&id).await,
                Lifecycle::Destroy => manager.destroy(&id).await,
            }
            .map_err(ServiceError::from);
            if let Some(j) = journals {
                let event = Event::new(format!("sandbox.{}", action.name())).by(Some(&actor));
                if let Some(journal) = j.journal(&id, Some(&info)).await {
                    journal.append(outcome(event, &result));
                }
                match (action, result.is_ok()) {
                    (Lifecycle::Destroy, true) => {
                        let seal = Event::new(kinds::SEAL)
                            .by(Some(&actor))
                            .attr(attr::SEAL_REASON, "destroyed");
                        j.seal(&id, seal).await;
                    }
                    (Lifecycle::Stop | Lifecycle::Suspend, true) => j.checkpoint(&id).await,
                    _ => {}
                }
            }
            result
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
        let info = self.authorize(caller, id).await?;
        let log = self.manager.console_log(id.as_str()).await?;
        self.note(
            caller,
            &info,
            Event::new("api.console").attr("hutch.bytes", log.len()),
        )
        .await;
        Ok(log)
    }

    async fn set_network(
        &self,
        caller: &Caller,
        id: &SandboxId,
        policy: NetworkPolicy,
    ) -> Result<SandboxInfo> {
        let info = self.authorize(caller, id).await?;
        let event = Event::new("network.policy").attr(
            "hutch.network.policy",
            serde_json::to_value(&policy).unwrap_or_default(),
        );
        let (manager, id) = (self.manager.clone(), id.to_string());
        let info = self
            .change(caller, info, event, async move {
                manager.set_network(&id, policy).await
            })
            .await?;
        Ok(info.redacted())
    }

    async fn network_log(&self, caller: &Caller, id: &SandboxId) -> Result<Vec<FlowEvent>> {
        let info = self.authorize(caller, id).await?;
        let events = self.manager.network_events(id.as_str()).await?;
        self.note(caller, &info, Event::new("api.network_log"))
            .await;
        Ok(events)
    }

    async fn publish_port(
        &self,
        caller: &Caller,
        id: &SandboxId,
        guest_port: u16,
        host_port: Option<u16>,
    ) -> Result<PublishedPort> {
        let info = self.authorize(caller, id).await?;
        let event = Event::new("network.port.publish")
            .attr("hutch.port.guest", guest_port)
            .attr("hutch.port.host", host_port);
        let (manager, id) = (self.manager.clone(), id.to_string());
        self.change(caller, info, event, async move {
            manager.publish_port(&id, guest_port, host_port).await
        })
        .await
    }

    async fn unpublish_port(
        &self,
        caller: &Caller,
        id: &SandboxId,
        guest_port: u16,
    ) -> Result<Vec<PublishedPort>> {
        let info = self.authorize(caller, id).await?;
        let event = Event::new("network.port.unpublish").attr("hutch.port.guest", guest_port);
        let (manager, id) = (self.manager.clone(), id.to_string());
        self.change(caller, info, event, async move {
            manager.unpublish_port(&id, guest_port).await
        })
        .await
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
        let env = command.env.clone();
        let req = self.exec_request(&info, command, stdin.is_some())?;
        let metrics = self.manager.metrics();
        metrics.exec_started(ExecKind::Capped);
        let started = std::time::Instant::now();
        let tap = self.exec_tap(caller, &info, "exec", &req, &env).await;
        let record = |n: usize, data: &[u8]| {
            if let Some(tap) = &tap {
                tap.record(n, data);
            }
        };
        let result =
            run_capped_observed(&channel, req, stdin, limit, OverCap::Drop, None, record).await;
        metrics.exec_finished(started.elapsed());
        if let Some(mut tap) = tap {
            tap.end_capped(&result);
        }
        Ok(result?)
    }

    async fn exec_stream(
        &self,
        caller: &Caller,
        id: &SandboxId,
        command: Command,
        tty: Option<TtySize>,
    ) -> Result<ExecStream> {
        let info = self.authorize(caller, id).await?;
        let channel = self.manager.channel(id.as_str()).await?;
        let env = command.env.clone();
        let mut req = self.exec_request(&info, command, true)?;
        req.tty = tty;
        self.manager.metrics().exec_started(ExecKind::Stream);
        let mut tap = self
            .exec_tap(caller, &info, "exec_stream", &req, &env)
            .await;
        match channel.exec(req).await {
            Ok(exec) => Ok(ExecStream::new(exec, tap)),
            Err(e) => {
                let e = ServiceError::exec_start(e);
                if let Some(tap) = &mut tap {
                    tap.end(
                        None,
                        Event::default().attr(attr::ERROR_MESSAGE, e.to_string()),
                    );
                }
                Err(e)
            }
        }
    }

    async fn write_file(
        &self,
        caller: &Caller,
        id: &SandboxId,
        path: &str,
        mode: u32,
        body: ByteStream,
    ) -> Result<()> {
        let (info, path, channel) = self.target(caller, id, path).await?;
        let tally = Tally::default();
        let body = tally.stream(body);
        let result = transfer::write_file(&channel, path.clone(), mode, body).await;
        let event = tally.attrs(Event::new("file.write"), "in", &path);
        self.note(caller, &info, outcome(event, &result)).await;
        result
    }

    async fn read_file(
        &self,
        caller: &Caller,
        id: &SandboxId,
        path: &str,
        sink: DuplexStream,
    ) -> Result<()> {
        let (info, path, channel) = self.target(caller, id, path).await?;
        let tally = Tally::default();
        let (ours, pump) = tally.pipe(sink);
        let (result, ()) = tokio::join!(transfer::read_file(&channel, path.clone(), ours), pump);
        let event = tally.attrs(Event::new("file.read"), "out", &path);
        self.note(caller, &info, outcome(event, &result)).await;
        result
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
        let req = self.exec_request(&info, unpack, true)?;
        let tally = Tally::default();
        let result = transfer::put_archive(&channel, req, tally.stream(body)).await;
        let event = tally.attrs(Event::new("archive.put"), "in", &dir);
        self.note(caller, &info, outcome(event, &result)).await;
        result
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
        let req = self.exec_request(&info, pack, false)?;
        let tally = Tally::default();
        let (ours, pump) = tally.pipe(sink);
        let packed = transfer::get_archive(&channel, req, dir.clone(), ours);
        let (result, ()) = tokio::join!(packed, pump);
        let event = tally.attrs(Event::new("archive.get"), "out", &dir);
        self.note(caller, &info, outcome(event, &result)).await;
        result
    }

    async fn fork(&self, caller: &Caller, id: &SandboxId, count: u32) -> Result<Vec<SandboxInfo>> {
        let info = self.authorize(caller, id).await?;
        let (manager, journals) = (self.manager.clone(), self.journals.clone());
        let event = Event::new("sandbox.fork").attr("hutch.fork.count", count);
        let (caller_, info_) = (caller.clone(), info.clone());
        let children = self
            .change(caller, info, event, async move {
                let children = manager.fork(info_.id.as_str(), count).await?;
                if let Some(j) = &journals {
                    for child in &children {
                        let first = create_event(child, Some(&caller_.actor), None);
                        j.start(child, first).await;
                    }
                }
                Ok(children)
            })
            .await?;
        Ok(children.into_iter().map(SandboxInfo::redacted).collect())
    }

    async fn audit(&self, caller: &Caller, id: &SandboxId, query: AuditQuery) -> Result<AuditLog> {
        self.authorize(caller, id).await?;
        Ok(self.journals_or_404()?.read(id.as_str(), query).await?)
    }

    async fn audit_verify(&self, caller: &Caller, id: &SandboxId) -> Result<Report> {
        self.authorize(caller, id).await?;
        Ok(self.journals_or_404()?.verify(id.as_str()).await?)
    }

    async fn recording(&self, caller: &Caller, id: &SandboxId, exec: &str) -> Result<Recording> {
        self.authorize(caller, id).await?;
        self.journals_or_404()?
            .recording(id.as_str(), exec)
            .await?
            .ok_or_else(|| {
                ServiceError::refused(
                    ErrorCode::NotFound,
                    format!("sandbox {id} has no finished exec {exec:?} with a recording"),
                )
            })
    }

    async fn checkpoint(&self, caller: &Caller, id: &SandboxId) -> Result<Option<String>> {
        self.authorize(caller, id).await?;
        Ok(match &self.journals {
            Some(j) => j.latest_checkpoint(id.as_str()).await,
            None => None,
        })
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

    async fn task_attestation(&self, caller: &Caller, id: &str) -> Result<Envelope> {
        caller.require_admin(TASKS_HOST_WIDE)?;
        Ok(self.tasks.attestation(id).await?)
    }

    async fn set_secret(&self, caller: &Caller, req: SetSecret) -> Result<SecretInfo> {
        let (store, scope) = (self.secret_store()?.clone(), caller.scope.clone());
        // Redacted before it can be used anywhere (a rotation: from the next record on).
        if let (Some(j), Ok(value)) = (&self.journals, std::str::from_utf8(req.value.expose())) {
            j.redact([value.to_string()]);
        }
        let info = off_worker(move || store.set(&scope, req)).await?;
        // A new value (rotation) goes live in every running broker that holds the secret.
        self.manager.refresh_brokers().await;
        Ok(info)
    }

    async fn secrets(&self, caller: &Caller) -> Result<Vec<SecretInfo>> {
        Ok(self.secret_store()?.list(&caller.scope))
    }

    async fn remove_secret(&self, caller: &Caller, name: &str) -> Result<SecretInfo> {
        let store = self.secret_store()?.clone();
        store.get(&caller.scope, name)?;
        let users: Vec<String> = self
            .manager
            .store()
            .list(&ListFilter::default())
            .await
            .map_err(crate::CoreError::from)?
            .into_iter()
            .filter(|s| {
                s.state != SandboxState::Destroyed && s.spec.secrets.iter().any(|n| n == name)
            })
            .map(|s| s.id)
            .collect();
        if !users.is_empty() {
            return Err(ServiceError::refused(
                ErrorCode::Conflict,
                format!(
                    "secret {name} is attached to {}: destroy them first",
                    users.join(", ")
                ),
            ));
        }
        let (scope, name) = (caller.scope.clone(), name.to_string());
        Ok(off_worker(move || store.remove(&scope, &name)).await?)
    }

    async fn secret_log(&self, caller: &Caller, id: &SandboxId) -> Result<Vec<BrokerEvent>> {
        self.authorize(caller, id).await?;
        Ok(match self.manager.secrets() {
            Some(store) => store.log().events(id.as_str()),
            None => Vec::new(),
        })
    }

    async fn metrics(&self, caller: &Caller) -> Result<String> {
        caller.require_admin(METRICS_HOST_WIDE)?;
        let mut states = BTreeMap::new();
        for info in self
            .manager
            .store()
            .list(&ListFilter::default())
            .await
            .map_err(CoreError::from)?
        {
            *states.entry(info.state.name().to_string()).or_insert(0u64) += 1;
        }
        Ok(self.manager.metrics().render(&states))
    }

    async fn identity_keys(&self) -> Result<serde_json::Value> {
        Ok(self.issuer()?.jwks())
    }

    async fn identity_discovery(&self) -> Result<serde_json::Value> {
        Ok(self.issuer()?.discovery())
    }
}
