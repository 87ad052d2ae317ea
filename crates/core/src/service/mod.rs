//! The one request surface: every operation a front end (the HTTP API, `hutch run` in
//! process, and later MCP, an E2B-compatible API or a fleet gateway) may ask of a host, in the
//! manner of Cloud Hypervisor's `RequestHandler`.
//!
//! Front ends only parse their wire format into these calls and format the results out.
//! Everything else happens here, once: the caller's scope ([`Caller`]), request validation
//! (argv, environment names, guest paths, upload caps), redaction of what a response must
//! not carry, running state changes to completion even when the caller goes away, capped and
//! streaming exec, and file and archive transfers with the archive checker in the stream.
//! [`LocalApi`] implements it on this host's [`Manager`](crate::Manager) and
//! [`Tasks`](crate::task::Tasks).

mod caller;
mod error;
mod local;
pub mod transfer;

use std::collections::BTreeMap;

use async_trait::async_trait;
use hutch_journal::{AuditLog, Recorder, Report};
use hutch_net::{FlowEvent, PublishedPort};
use hutch_protocol::{
    host::{ChannelError, Exec, ExecControl, ExecEvent},
    TtySize,
};
use hutch_store::ListFilter;
use hutch_task::{attest::Envelope, sign::SignatureCheck, Baseline, TaskRecord, TaskSpec};
use hutch_types::{
    BrokerEvent, NetworkPolicy, SandboxId, SandboxInfo, SandboxSpec, SecretInfo, TemplateInfo,
    TemplateSpec,
};
use tokio::io::DuplexStream;

pub use caller::Caller;
pub use error::ServiceError;
pub use local::{LocalApi, TASKS_HOST_WIDE};
pub use transfer::ByteStream;

use crate::{
    audit::{AuditQuery, ExecTap},
    exec::{Collected, OutputSink},
    recording::Recording,
    secrets::SetSecret,
};

/// A request's result.
pub type Result<T> = std::result::Result<T, ServiceError>;

/// A lifecycle change of one sandbox (the legality table in [`crate::lifecycle`] decides
/// whether it may happen in the sandbox's state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Freeze its vCPUs.
    Pause,
    /// Thaw a paused sandbox, or restore one paused to disk.
    Resume,
    /// Save memory and disk and stop its VMM.
    Suspend,
    /// Boot a stopped sandbox again.
    Start,
    /// Power it off, keeping its record.
    Stop,
    /// Remove it and everything it holds on the host.
    Destroy,
}

impl Lifecycle {
    /// Its name, as journals record it (`sandbox.<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Lifecycle::Pause => "pause",
            Lifecycle::Resume => "resume",
            Lifecycle::Suspend => "suspend",
            Lifecycle::Start => "start",
            Lifecycle::Stop => "stop",
            Lifecycle::Destroy => "destroy",
        }
    }
}

/// A running command with open stdin ([`SandboxApi::exec_stream`]): the guest's [`Exec`],
/// its output counted and hashed into the sandbox's journal as it passes, its end recorded.
/// Dropping it kills the command (and records it abandoned).
pub struct ExecStream {
    exec: Exec,
    tap: Option<ExecTap>,
}

impl ExecStream {
    /// `exec`, recorded by `tap` when the sandbox keeps a journal.
    pub fn new(exec: Exec, tap: Option<ExecTap>) -> ExecStream {
        ExecStream { exec, tap }
    }

    /// The process id inside the guest.
    pub fn pid(&self) -> u32 {
        self.exec.pid()
    }

    /// A handle for stdin, signals and resizes that can move to another task (input on a
    /// terminal and resizes go into the session recording).
    pub fn control(&self) -> StreamControl {
        StreamControl {
            inner: self.exec.control(),
            recorder: self.tap.as_ref().and_then(ExecTap::recorder),
        }
    }

    /// The next output or the exit.
    pub async fn next_event(&mut self) -> std::result::Result<ExecEvent, ChannelError> {
        let event = self.exec.next_event().await?;
        if let Some(tap) = &mut self.tap {
            match &event {
                ExecEvent::Stdout(d) => {
                    tap.output(0, d);
                    tap.record(0, d);
                }
                ExecEvent::Stderr(d) => {
                    tap.output(1, d);
                    tap.record(1, d);
                }
                ExecEvent::Exited(exit) => tap.end(
                    Some(exit.status),
                    hutch_journal::Event::default().attr("hutch.process.timed_out", exit.timed_out),
                ),
            }
        }
        Ok(event)
    }
}

/// Stdin, signals and resizes of an [`ExecStream`]; clones share the process. What is typed
/// into a terminal and each resize are recorded in the session recording before they go.
#[derive(Clone)]
pub struct StreamControl {
    inner: ExecControl,
    recorder: Option<Recorder>,
}

impl StreamControl {
    /// Streams bytes to the process's stdin, respecting the guest's credit.
    pub async fn write_stdin(&self, data: &[u8]) -> std::result::Result<(), ChannelError> {
        if let Some(r) = &self.recorder {
            r.input(data);
        }
        self.inner.write_stdin(data).await
    }

    /// Closes the process's stdin.
    pub async fn close_stdin(&self) -> std::result::Result<(), ChannelError> {
        self.inner.close_stdin().await
    }

    /// Sends `signal` to the process group.
    pub async fn signal(&self, signal: i32) -> std::result::Result<(), ChannelError> {
        self.inner.signal(signal).await
    }

    /// Resizes the process's terminal (when it runs under one).
    pub async fn resize(&self, size: TtySize) -> std::result::Result<(), ChannelError> {
        if let Some(r) = &self.recorder {
            r.resize(size.cols, size.rows);
        }
        self.inner.resize(size).await
    }
}

/// A command to run in a sandbox.
#[derive(Debug, Clone, Default)]
pub struct Command {
    /// Program and arguments (non-empty, free of NUL).
    pub argv: Vec<String>,
    /// Variables on top of the sandbox's own environment.
    pub env: BTreeMap<String, String>,
    /// Working directory in the guest.
    pub cwd: Option<String>,
    /// Kill it after this many seconds.
    pub timeout_secs: Option<u64>,
}

/// A sandbox to create.
#[derive(Debug, Clone, Default)]
pub struct Create {
    /// What to boot.
    pub spec: SandboxSpec,
    /// A key that makes retries return the first create's sandbox.
    pub idempotency_key: Option<String>,
}

/// Every operation on a host's sandboxes, templates and tasks. Each call names its
/// [`Caller`]; a sandbox outside the caller's scope is refused. Sandbox ids arrive parsed
/// ([`SandboxId`]): each front end refuses a malformed one at its edge.
#[async_trait]
pub trait SandboxApi: Send + Sync {
    /// Creates and boots a sandbox (or returns the earlier one with the same idempotency
    /// key): the sandbox and whether it is new.
    async fn create(&self, caller: &Caller, req: Create) -> Result<(SandboxInfo, bool)>;
    /// The sandboxes matching `filter` that the caller may see.
    async fn list(&self, caller: &Caller, filter: ListFilter) -> Result<Vec<SandboxInfo>>;
    /// One sandbox, its state confirmed by a health check.
    async fn get(&self, caller: &Caller, id: &SandboxId) -> Result<SandboxInfo>;
    /// One sandbox as recorded, without touching its guest: for a front end that must refuse
    /// an unknown or out-of-scope sandbox before it commits to a call (a WebSocket upgrade).
    async fn recorded(&self, caller: &Caller, id: &SandboxId) -> Result<SandboxInfo>;
    /// Changes a sandbox's lifecycle state.
    async fn lifecycle(
        &self,
        caller: &Caller,
        id: &SandboxId,
        action: Lifecycle,
    ) -> Result<SandboxInfo>;
    /// Replaces a sandbox's TTL: destroyed `ttl_secs` from now, or never with `None`.
    async fn set_ttl(
        &self,
        caller: &Caller,
        id: &SandboxId,
        ttl_secs: Option<u64>,
    ) -> Result<SandboxInfo>;
    /// The guest's console log (guest-controlled bytes).
    async fn console(&self, caller: &Caller, id: &SandboxId) -> Result<Vec<u8>>;
    /// Replaces a sandbox's egress policy.
    async fn set_network(
        &self,
        caller: &Caller,
        id: &SandboxId,
        policy: NetworkPolicy,
    ) -> Result<SandboxInfo>;
    /// The sandbox's recent network decisions.
    async fn network_log(&self, caller: &Caller, id: &SandboxId) -> Result<Vec<FlowEvent>>;
    /// Publishes a guest port on the host (on `host_port`, or any free one).
    async fn publish_port(
        &self,
        caller: &Caller,
        id: &SandboxId,
        guest_port: u16,
        host_port: Option<u16>,
    ) -> Result<PublishedPort>;
    /// Unpublishes a guest port: the ports still published.
    async fn unpublish_port(
        &self,
        caller: &Caller,
        id: &SandboxId,
        guest_port: u16,
    ) -> Result<Vec<PublishedPort>>;
    /// The sandbox's published ports.
    async fn ports(&self, caller: &Caller, id: &SandboxId) -> Result<Vec<PublishedPort>>;
    /// Runs a command to its end, feeding `stdin`, keeping at most `limit` bytes per stream.
    async fn exec(
        &self,
        caller: &Caller,
        id: &SandboxId,
        command: Command,
        stdin: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<Collected>;
    /// Starts a command with open stdin (and a terminal when `tty` is set) and hands back
    /// its stream; dropping it kills the command.
    async fn exec_stream(
        &self,
        caller: &Caller,
        id: &SandboxId,
        command: Command,
        tty: Option<TtySize>,
    ) -> Result<ExecStream>;
    /// Writes `body` to the guest file `path` (octal `mode`), making parent directories.
    async fn write_file(
        &self,
        caller: &Caller,
        id: &SandboxId,
        path: &str,
        mode: u32,
        body: ByteStream,
    ) -> Result<()>;
    /// Copies the guest file `path` into `sink`.
    async fn read_file(
        &self,
        caller: &Caller,
        id: &SandboxId,
        path: &str,
        sink: DuplexStream,
    ) -> Result<()>;
    /// Unpacks the tar `body` into the guest directory `dir`, checking every entry.
    async fn put_archive(
        &self,
        caller: &Caller,
        id: &SandboxId,
        dir: &str,
        body: ByteStream,
    ) -> Result<()>;
    /// Packs the guest directory `dir` as a tar into `sink`, checking every entry.
    async fn get_archive(
        &self,
        caller: &Caller,
        id: &SandboxId,
        dir: &str,
        sink: DuplexStream,
    ) -> Result<()>;
    /// The sandbox's journal: the records `query` asks for and the latest checkpoint.
    async fn audit(&self, caller: &Caller, id: &SandboxId, query: AuditQuery) -> Result<AuditLog>;
    /// Verifies the sandbox's journal against this host's key.
    async fn audit_verify(&self, caller: &Caller, id: &SandboxId) -> Result<Report>;
    /// The session recording of one of the sandbox's execs (by its id, the seq of one of its
    /// journal records, or `latest`), checked against the digest its journal names.
    async fn recording(&self, caller: &Caller, id: &SandboxId, exec: &str) -> Result<Recording>;
    /// The latest signed checkpoint of the sandbox's journal (none without one).
    async fn checkpoint(&self, caller: &Caller, id: &SandboxId) -> Result<Option<String>>;
    /// Clones a running sandbox `count` times: the children, running.
    async fn fork(&self, caller: &Caller, id: &SandboxId, count: u32) -> Result<Vec<SandboxInfo>>;
    /// Boots, provisions and saves a template (host-wide: admin only).
    async fn create_template(&self, caller: &Caller, spec: TemplateSpec) -> Result<TemplateInfo>;
    /// Every template.
    async fn templates(&self, caller: &Caller) -> Result<Vec<TemplateInfo>>;
    /// One template.
    async fn template(&self, caller: &Caller, name: &str) -> Result<TemplateInfo>;
    /// Removes a template no sandbox uses (admin only).
    async fn remove_template(&self, caller: &Caller, name: &str) -> Result<TemplateInfo>;
    /// Sets how many clones of a template are kept ready (admin only).
    async fn set_pool(&self, caller: &Caller, name: &str, size: u32) -> Result<TemplateInfo>;
    /// Runs an agent task on `workspace` (a tar) to its end, streaming output to `sink`
    /// (admin only).
    async fn run_task(
        &self,
        caller: &Caller,
        spec: TaskSpec,
        workspace: Vec<u8>,
        sink: Option<OutputSink>,
    ) -> Result<TaskRecord>;
    /// Every task's record (admin only).
    async fn tasks(&self, caller: &Caller) -> Result<Vec<TaskRecord>>;
    /// One task's record (admin only).
    async fn task(&self, caller: &Caller, id: &str) -> Result<TaskRecord>;
    /// The host baseline of a task's workspace (admin only).
    async fn task_baseline(&self, caller: &Caller, id: &str) -> Result<Baseline>;
    /// A task's validated changeset, as stored (admin only).
    async fn task_changeset(&self, caller: &Caller, id: &str) -> Result<Vec<u8>>;
    /// A task's changes as a unified diff (admin only).
    async fn task_diff(&self, caller: &Caller, id: &str) -> Result<String>;
    /// Whether a task is as its attestation says: its signatures, the stored files and the
    /// record's attested facts (admin only).
    async fn task_signature(&self, caller: &Caller, id: &str) -> Result<SignatureCheck>;
    /// A task's attestation: an in-toto statement in a DSSE envelope signed by its sandbox's
    /// key and the host key (admin only; not found for a task stored before attestations).
    async fn task_attestation(&self, caller: &Caller, id: &str) -> Result<Envelope>;
    /// Sets a secret, or rotates one the caller may see (same identity and placeholders, new
    /// value, live). Its value is never answered.
    async fn set_secret(&self, caller: &Caller, req: SetSecret) -> Result<SecretInfo>;
    /// The secrets the caller may see: names, variables, bindings, labels; never values.
    async fn secrets(&self, caller: &Caller) -> Result<Vec<SecretInfo>>;
    /// Removes a secret the caller may see that no sandbox (but a destroyed one) has attached.
    async fn remove_secret(&self, caller: &Caller, name: &str) -> Result<SecretInfo>;
    /// What the broker did with a sandbox's secrets (never a value or a placeholder).
    async fn secret_log(&self, caller: &Caller, id: &SandboxId) -> Result<Vec<BrokerEvent>>;
    /// The host's metrics in the Prometheus text format (host-wide: admin only).
    async fn metrics(&self, caller: &Caller) -> Result<String>;
    /// The public keys that verify guests' identity tokens, as a JWKS (public: anyone may
    /// verify); `not_found` where this host issues none.
    async fn identity_keys(&self) -> Result<serde_json::Value>;
    /// The identity issuer's OpenID-style discovery document (public); `not_found` where
    /// this host issues none.
    async fn identity_discovery(&self) -> Result<serde_json::Value>;
}
