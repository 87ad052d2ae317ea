//! Agent tasks (`hutch task run`): a workspace goes into a fresh sandbox, the agent command
//! runs there, the guest computes the changeset against the host's baseline, and the host
//! validates it ([`hutch_task::changeset::validate`]) and stores the task under
//! `$HUTCH_HOME/tasks/<id>/`. With `verify`, the accepted changeset is applied in another fresh
//! sandbox without a network and the command's verdict recorded. Sandboxes are always
//! destroyed; the host never runs workspace code. The agent's output streams to an optional
//! sink while it runs; a task cut off by a daemon restart is marked failed by
//! [`Tasks::recover`]. Each task sandbox has a journal, which records the agent's (and the
//! verify) command like any exec; before the agent's sandbox is destroyed (its journal sealed,
//! its identity key destroyed) the task's result is attested ([`hutch_task::attest`]): an
//! in-toto statement in a DSSE envelope signed by that sandbox's key and the host key, stored
//! as `attestation.json`. The attestation is the task's signed record: `record.json` is its
//! unsigned log (output, timings, the verify run), checked against the attestation where the
//! two say the same thing ([`attest::check_task`]).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use hutch_journal::{attr, kinds, Actor, Event, JournalError};
use hutch_protocol::{host::Channel, ExecRequest, ExitStatus, WriteFileRequest};
use hutch_store::ListFilter;
use hutch_task::{
    archive::ArchiveError,
    attest::{self, Envelope, Statement},
    baseline::{sha256_hex, tar_files},
    changeset::validate,
    sign::{HostKey, KeyError, SignatureCheck},
    BaseEntry, Baseline, Change, Changeset, ProcessOutcome, TaskRecord, TaskSpec, Verdict,
    VerifyOutcome,
};
use hutch_types::{ErrorCode, NetworkPolicy, SandboxInfo, SandboxSpec};
use rand::RngCore;

use crate::{
    audit::{create_event, JournalSink, Journals},
    blocking::off_worker,
    chain,
    exec::{run_capped, run_capped_observed, split_status, Collected, ExecError, OverCap},
    now_ms, CoreError, Manager,
};

/// Where the workspace lives in the guest.
pub const GUEST_WORKSPACE: &str = "/workspace";
const HELPER: &str = "/opt/hutch-task/task.py";
const GUEST_BASELINE: &str = "/opt/hutch-task/baseline.json";
const GUEST_CHANGESET: &str = "/opt/hutch-task/changeset.bin";
/// Output kept per stream of the agent and of the verify command.
const OUTPUT_CAP: usize = 1 << 20;
/// Longest agent or verify timeout.
const MAX_TIMEOUT_SECS: u64 = 24 * 3600;
/// The label every task sandbox carries, valued with the task's id.
pub const TASK_LABEL: &str = "hutch.task";
/// The task's attestation (a DSSE envelope, JSON), beside its record.
pub const ATTESTATION: &str = "attestation.json";
/// Why a task without a record is marked failed at daemon start.
const INTERRUPTED: &str = "interrupted by a daemon restart";

/// The operation of the agent command's `exec.start` record in its sandbox's journal.
pub const AGENT_OPERATION: &str = "task.agent";
/// The operation of the verify command's `exec.start` record.
pub const VERIFY_OPERATION: &str = "task.verify";

/// A task command's exec as its journal records it.
struct Journalled<'a> {
    /// The sandbox it runs in.
    info: &'a SandboxInfo,
    /// The task.
    task: &'a str,
    /// [`AGENT_OPERATION`] or [`VERIFY_OPERATION`].
    operation: &'static str,
    /// The task's own variables (their values are redacted).
    env: &'a BTreeMap<String, String>,
}

/// Where a running task's output goes as it comes (the agent's and the verify command's).
pub use crate::exec::OutputSink;

/// Why a task could not be run or read.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The spec is unusable.
    #[error("bad task spec: {0}")]
    Spec(String),
    /// The workspace archive is unusable.
    #[error("bad workspace archive")]
    Archive(#[source] ArchiveError),
    /// No task has this id.
    #[error("no such task: {0:.40}")]
    NotFound(String),
    /// The task has no accepted changeset.
    #[error("task {0} has no accepted changeset")]
    NoChangeset(String),
    /// Reading or writing the task store failed.
    #[error("task store: {}", .path.display())]
    Store {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A stored record does not decode.
    #[error("task record {} is corrupt", .path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The host's signing key is unusable.
    #[error("task signing key")]
    Key(#[source] KeyError),
    /// The sandboxes left by interrupted tasks could not be listed.
    #[error("listing task sandboxes")]
    Sandboxes(#[source] CoreError),
    /// This host keeps no sandbox journals, so no sandbox key can attest a task.
    #[error("this host keeps no sandbox journals: the task cannot be attested")]
    NoJournals,
    /// The sandbox's journal could not checkpoint, name or sign with its key.
    #[error("the sandbox journal of task {task}")]
    Journal {
        /// The task.
        task: String,
        /// Why.
        #[source]
        source: JournalError,
    },
    /// The task has no attestation: it ended before its sandbox attested it.
    #[error(
        "task {0} has no attestation: it ended before its sandbox attested it (see its error)"
    )]
    Unattested(String),
    /// The task's record was signed by a hutch from before attestations.
    #[error("task {0}: {why}", why = attest::LEGACY_RECORD)]
    Legacy(String),
}

impl TaskError {
    /// The API error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            TaskError::Spec(_) => ErrorCode::BadRequest,
            TaskError::Archive(_) => ErrorCode::UnsafePath,
            TaskError::NotFound(_)
            | TaskError::NoChangeset(_)
            | TaskError::Unattested(_)
            | TaskError::Legacy(_) => ErrorCode::NotFound,
            TaskError::Store { .. }
            | TaskError::Corrupt { .. }
            | TaskError::Key(_)
            | TaskError::Sandboxes(_)
            | TaskError::NoJournals
            | TaskError::Journal { .. } => ErrorCode::Internal,
        }
    }
}

/// Why one step inside a task's sandbox failed (recorded, not returned).
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("guest channel")]
    Channel(#[from] hutch_protocol::host::ChannelError),

    #[error("{what} failed in the guest ({status:?}): {stderr}")]
    Guest {
        what: &'static str,
        status: ExitStatus,
        stderr: String,
    },
}

impl From<ExecError> for StepError {
    fn from(e: ExecError) -> StepError {
        StepError::Channel(e.into_channel())
    }
}

/// The task store and runner.
#[derive(Clone)]
pub struct Tasks {
    dir: PathBuf,
    manager: Arc<Manager>,
    /// The journals of task sandboxes, when kept; their sandbox keys attest the tasks' results
    /// (without journals, no task is attested).
    journals: std::sync::OnceLock<Arc<Journals>>,
}

/// The journal record of a task's changeset: its digest, the paths it changes, the verdict.
fn changeset_event(task: &str, record: &TaskRecord) -> Event {
    let verdict = serde_json::to_value(&record.verdict)
        .ok()
        .and_then(|v| v.get("status")?.as_str().map(String::from))
        .unwrap_or_default();
    let files: Vec<String> = record
        .changes
        .iter()
        .flat_map(|c| c.paths())
        .map(String::from)
        .collect();
    let mut event = Event::new("task.changeset")
        .attr(attr::TASK_ID, task)
        .attr(attr::TASK_VERDICT, verdict)
        .attr(attr::TASK_CHANGESET_FILES, files);
    if let Some(digest) = &record.changeset_digest {
        event = event.attr(attr::TASK_CHANGESET_DIGEST, digest.clone());
    }
    if let Some(e) = &record.error {
        event = event.attr(attr::ERROR_MESSAGE, e.clone());
    }
    event
}

/// The journal record of a task's verification: the command, its exit, passed or not.
fn verify_event(task: &str, r: &Result<VerifyOutcome, StepError>) -> Event {
    let event = Event::new("task.verify").attr(attr::TASK_ID, task);
    match r {
        Ok(v) => {
            let mut event = event
                .attr("process.command_line", v.command.clone())
                .attr("hutch.task.verify.passed", v.passed);
            if let Some(code) = v.process.exit_code {
                event = event.attr(attr::PROCESS_EXIT_CODE, code);
            }
            event
        }
        Err(e) => event.attr(attr::ERROR_MESSAGE, chain(e)),
    }
}

/// What a task's attestation says of its workspace: the archive's SHA-256 and git `HEAD`.
struct WorkspaceDigests {
    sha256: String,
    base: Option<String>,
}

/// A stream as stored: lossy UTF-8, with a note when bytes beyond the cap were dropped.
fn stored(b: &[u8], dropped: u64) -> String {
    let mut s = String::from_utf8_lossy(b).into_owned();
    if dropped > 0 {
        s.push_str(&format!(
            "\n[hutch: {dropped} more bytes of output were not stored (the record keeps {OUTPUT_CAP} per stream)]\n"
        ));
    }
    s
}

fn excerpt(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .chars()
        .filter(|c| !c.is_control() || *c == '\n')
        .take(400)
        .collect()
}

fn outcome(c: &Collected, started: Instant) -> ProcessOutcome {
    let (exit_code, signal) = split_status(c.status);
    ProcessOutcome {
        exit_code,
        signal,
        timed_out: c.timed_out,
        stdout: stored(&c.stdout, c.dropped[0]),
        stderr: stored(&c.stderr, c.dropped[1]),
        truncated: c.truncated(),
        millis: started.elapsed().as_millis() as u64,
    }
}

/// Who acts for a task in its sandboxes' journals: the daemon, for the task's run.
fn task_actor(task: &str) -> Actor {
    Actor {
        principal: "daemon".into(),
        request_id: Some(task.into()),
    }
}

/// The journal record of a task's end in its sandbox: what ran, how it ended, the verdict and
/// the changeset.
fn end_event(record: &TaskRecord) -> Event {
    let mut event = Event::new("task.end")
        .by(Some(&task_actor(&record.id)))
        .attr(attr::PROCESS_COMMAND_ARGS, record.spec.command.clone())
        .attr(
            "hutch.task.verdict",
            serde_json::to_value(&record.verdict).unwrap_or_default(),
        )
        .attr("hutch.task.changes", record.changes.len());
    if let Some(code) = record.agent.as_ref().and_then(|a| a.exit_code) {
        event = event.attr(attr::PROCESS_EXIT_CODE, code);
    }
    if let Some(digest) = &record.changeset_digest {
        event = event.attr("hutch.changeset.sha256", digest.clone());
    }
    event
}

fn ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

/// Whether `id` has the shape of a task id (so it never reaches the filesystem otherwise).
pub fn valid_task_id(id: &str) -> bool {
    id.strip_prefix("task-").is_some_and(|h| {
        h.len() == 10
            && h.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    })
}

fn check_spec(spec: &TaskSpec) -> Result<(), TaskError> {
    let bad = |s: &str| Err(TaskError::Spec(s.into()));
    if spec.command.is_empty() || spec.command.iter().any(|a| a.contains('\0')) {
        return bad("the command must be non-empty and free of NUL");
    }
    if let Some(k) = spec.env.keys().find(|k| !hutch_types::valid_env_name(k)) {
        return Err(TaskError::Spec(format!("invalid variable name {k:.40}")));
    }
    if spec.env.values().any(|v| v.contains('\0')) {
        return bad("environment values must be free of NUL");
    }
    if spec.timeout_secs == 0 || spec.timeout_secs > MAX_TIMEOUT_SECS {
        return bad("the timeout must be between 1 s and 24 h");
    }
    if spec.allow.iter().any(|g| g.is_empty() || g.contains('\0')) {
        return bad("--allow globs must be non-empty and free of NUL");
    }
    if spec
        .verify
        .as_deref()
        .is_some_and(|v| v.is_empty() || v.contains('\0'))
    {
        return bad("the verify command must be non-empty and free of NUL");
    }
    if spec
        .template
        .as_deref()
        .is_some_and(|t| !hutch_types::valid_name(t))
    {
        return bad("invalid template name");
    }
    let l = spec.limits;
    if l.max_files == 0
        || l.max_file_bytes == 0
        || l.max_total_bytes == 0
        || l.max_total_bytes > 1 << 30
    {
        return bad("limits must be positive, the total at most 1 GiB");
    }
    Ok(())
}

impl Tasks {
    /// Tasks stored under `dir` (`$HUTCH_HOME/tasks`), run through `manager`.
    pub fn new(dir: PathBuf, manager: Arc<Manager>) -> Tasks {
        Tasks {
            dir,
            manager,
            journals: std::sync::OnceLock::new(),
        }
    }

    /// Journals every task sandbox in `journals` from now on (its creation, the changeset or
    /// verification, the seal). Set once; later calls are ignored.
    pub fn set_journals(&self, journals: Arc<Journals>) {
        let _ = self.journals.set(journals);
    }

    /// Appends `event` to the journal of the task sandbox `sandbox`, when journals are kept.
    async fn journal(&self, sandbox: &str, event: Event) {
        if let Some(j) = self.journals.get() {
            j.record(sandbox, event).await;
        }
    }

    fn task_dir(&self, id: &str) -> Result<PathBuf, TaskError> {
        if !valid_task_id(id) {
            return Err(TaskError::NotFound(id.into()));
        }
        let dir = self.dir.join(id);
        if !dir.join("record.json").exists() {
            return Err(TaskError::NotFound(id.into()));
        }
        Ok(dir)
    }

    fn write(path: &Path, data: &[u8]) -> Result<(), TaskError> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, data)
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|source| TaskError::Store {
                path: path.into(),
                source,
            })
    }

    fn read(path: &Path) -> Result<Vec<u8>, TaskError> {
        std::fs::read(path).map_err(|source| TaskError::Store {
            path: path.into(),
            source,
        })
    }

    fn json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, TaskError> {
        serde_json::from_slice(&Self::read(path)?).map_err(|source| TaskError::Corrupt {
            path: path.into(),
            source,
        })
    }

    /// Runs a task to its end and stores it, signed; the agent's and the verify command's
    /// output also go to `sink` as they come. Only a bad spec or archive (or an unusable
    /// signing key) is an error; what goes wrong in a sandbox is recorded in the task
    /// (`error`, `verdict`).
    pub async fn run(
        &self,
        spec: TaskSpec,
        workspace_tar: Vec<u8>,
        sink: Option<OutputSink>,
    ) -> Result<TaskRecord, TaskError> {
        check_spec(&spec)?;
        // Hashing a big workspace takes a while: off the async workers.
        let (workspace_tar, baseline, digests) = off_worker(move || {
            let baseline = Baseline::from_tar(&workspace_tar).map_err(TaskError::Archive)?;
            let digests = WorkspaceDigests {
                sha256: sha256_hex(&workspace_tar),
                base: attest::base_commit(&workspace_tar),
            };
            Ok::<_, TaskError>((workspace_tar, baseline, digests))
        })
        .await?;
        let key = self.key()?;
        let started = Instant::now();
        let id = format!(
            "task-{:010x}",
            rand::thread_rng().next_u64() & 0xff_ffff_ffff
        );
        let dir = self.dir.join(&id);
        let baseline_json = serde_json::to_vec(&baseline).expect("serializable");
        let spec_json = serde_json::to_vec_pretty(&spec).expect("serializable");
        let (workspace_tar, baseline_json) = off_worker({
            let dir = dir.clone();
            move || {
                std::fs::create_dir_all(&dir).map_err(|source| TaskError::Store {
                    path: dir.clone(),
                    source,
                })?;
                Self::write(&dir.join("spec.json"), &spec_json)?;
                Self::write(&dir.join("workspace.tar"), &workspace_tar)?;
                Self::write(&dir.join("baseline.json"), &baseline_json)?;
                Ok::<_, TaskError>((workspace_tar, baseline_json))
            }
        })
        .await?;
        let mut record = TaskRecord {
            id: id.clone(),
            spec: spec.clone(),
            created_ms: now_ms(),
            baseline_digest: baseline.digest(),
            baseline_files: baseline.workspace_entries(),
            agent: None,
            verdict: Verdict::ExtractionFailed {
                reason: "the agent did not run".into(),
            },
            changes: vec![],
            not_carried: vec![],
            changeset_digest: None,
            verify: None,
            timings: Default::default(),
            error: None,
            signature: None,
        };
        let mut encoded = Ok(None);
        let sb = SandboxSpec {
            template: spec.template.clone(),
            network: spec.network.clone(),
            secrets: spec.secrets.clone(),
            labels: [(TASK_LABEL.to_string(), id.clone())].into(),
            ..Default::default()
        };
        let t = Instant::now();
        match self.create_sandbox(&id, sb).await {
            Err(e) => record.error = Some(format!("creating the sandbox: {}", chain(&e))),
            Ok(info) => {
                record.timings.create_ms = ms(t);
                let r = self
                    .agent_steps(
                        &info.id,
                        &spec,
                        &workspace_tar,
                        &baseline_json,
                        &baseline,
                        &mut record,
                        sink.as_ref(),
                    )
                    .await;
                let changeset = match r {
                    Ok(cs) => cs,
                    Err(e) => {
                        record.error = Some(chain(&e));
                        None
                    }
                };
                // Stored before the sandbox goes, so that its journal records the digest.
                encoded = Self::store_changeset(&dir, changeset).await;
                if let Ok(Some((_, digest))) = &encoded {
                    record.changeset_digest = Some(digest.clone());
                }
                self.journal(&info.id, changeset_event(&id, &record)).await;
                // Signed now: the sandbox's key is destroyed with it.
                if let Err(e) = self.attest(&info, &record, &digests, &key, &dir).await {
                    record.error = Some(match record.error.take() {
                        Some(before) => format!("{before}; attesting: {}", chain(&e)),
                        None => format!("attesting: {}", chain(&e)),
                    });
                }
                self.destroy(&info.id).await;
            }
        }
        let stream = encoded?;
        let stream = stream.map(|(stream, _)| stream);
        let verifiable = matches!(record.verdict, Verdict::Accepted { .. } | Verdict::Empty);
        if let (Some(cmd), true) = (&spec.verify, verifiable) {
            let t = Instant::now();
            let verified = self
                .verify(&id, &spec, cmd, &workspace_tar, stream, sink.as_ref())
                .await;
            match verified {
                Ok(v) => record.verify = Some(v),
                Err(e) => record.error = Some(format!("verification: {}", chain(&e))),
            }
            record.timings.verify_ms = ms(t);
        }
        record.timings.total_ms = ms(started);
        off_worker(move || Self::store_record(&dir, &record).map(|()| record)).await
    }

    /// Encodes, hashes and writes a changeset of up to a GiB (off the async workers): the
    /// stream and its SHA-256.
    async fn store_changeset(
        dir: &Path,
        changeset: Option<Changeset>,
    ) -> Result<Option<(Vec<u8>, String)>, TaskError> {
        let Some(cs) = changeset else {
            return Ok(None);
        };
        let path = dir.join("changeset.bin");
        off_worker(move || {
            let stream = cs.encode();
            let digest = sha256_hex(&stream);
            Self::write(&path, &stream).map(|()| Some((stream, digest)))
        })
        .await
    }

    /// Creates a sandbox for task `task`, starting its journal.
    async fn create_sandbox(
        &self,
        task: &str,
        spec: SandboxSpec,
    ) -> Result<SandboxInfo, CoreError> {
        let (info, _) = self.manager.create(spec, None).await?;
        if let Some(j) = self.journals.get() {
            let digest = self.manager.image(&info.spec.image).ok().map(|i| i.digest);
            let first = create_event(&info, Some(&task_actor(task)), digest.as_deref());
            j.start(&info, first).await;
        }
        Ok(info)
    }

    /// Attests what task `record` did in the sandbox `info` (which still runs): records its
    /// end in the sandbox's journal, checkpoints it, and stores in `dir` the statement in a
    /// DSSE envelope signed by the sandbox's identity key and by `key`.
    async fn attest(
        &self,
        info: &SandboxInfo,
        record: &TaskRecord,
        workspace: &WorkspaceDigests,
        key: &HostKey,
        dir: &Path,
    ) -> Result<(), TaskError> {
        let journals = self.journals.get().ok_or(TaskError::NoJournals)?;
        let journal_error = |source| TaskError::Journal {
            task: record.id.clone(),
            source,
        };
        journals.record(&info.id, end_event(record)).await;
        let identity = journals.identity(&info.id).await.map_err(journal_error)?;
        let note = journals
            .checkpoint_note(&info.id)
            .await
            .map_err(journal_error)?;
        let image = self.manager.image(&info.spec.image).ok();
        let predicate = attest::TaskPredicate {
            task: record.id.clone(),
            sandbox: attest::SandboxIdentity {
                id: info.id.clone(),
                public_key: hex::encode(identity.public),
                certificate: identity.certificate,
            },
            host_key: key.public_hex(),
            command: record.spec.command.clone(),
            image: attest::ImageRef {
                name: info.spec.image.clone(),
                template: record.spec.template.clone(),
                digest: image.map(|i| i.digest),
            },
            network: record.spec.network.clone(),
            policy: attest::AttestedPolicy {
                allow: record.spec.allow.clone(),
                limits: record.spec.limits,
            },
            exit: record.agent.as_ref().map(|a| attest::Exit {
                code: a.exit_code,
                signal: a.signal,
                timed_out: a.timed_out,
            }),
            verdict: record.verdict.clone(),
            baseline_digest: record.baseline_digest.clone(),
            journal_checkpoint: Some(note),
            finished_ms: now_ms(),
        };
        let statement = Statement::new(
            predicate,
            record.changeset_digest.clone(),
            workspace.sha256.clone(),
            workspace.base.clone(),
        );
        let mut envelope = Envelope::new(&statement);
        let sandbox_sig = journals
            .sign_dsse(&info.id, envelope.pae())
            .await
            .map_err(journal_error)?;
        envelope.add_signature(&identity.public, &sandbox_sig);
        envelope.add_signature(&key.public_bytes(), &key.sign_bytes(&envelope.pae()));
        let json = serde_json::to_vec_pretty(&envelope).expect("serializable");
        let path = dir.join(ATTESTATION);
        off_worker(move || Self::write(&path, &json)).await
    }

    /// The host's signing key (made on first use).
    fn key(&self) -> Result<HostKey, TaskError> {
        HostKey::load_or_create(&self.dir.join("host.key")).map_err(TaskError::Key)
    }

    /// Stores `record` as the task's `record.json` in `dir` (unsigned: the attestation is
    /// what vouches for a task).
    fn store_record(dir: &Path, record: &TaskRecord) -> Result<(), TaskError> {
        Self::write(
            &dir.join("record.json"),
            &serde_json::to_vec_pretty(record).expect("serializable"),
        )
    }

    /// At daemon start: every task that has no record was cut off by the last daemon's end.
    /// Each is stored as failed ("interrupted by a daemon restart"), and every sandbox that a
    /// task labelled ([`TASK_LABEL`]) is destroyed (no task runs before this returns).
    /// Returns the ids of the interrupted tasks.
    pub async fn recover(&self) -> Result<Vec<String>, TaskError> {
        let mut interrupted = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e.flatten().collect::<Vec<_>>(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
            Err(source) => {
                return Err(TaskError::Store {
                    path: self.dir.clone(),
                    source,
                })
            }
        };
        for e in entries {
            let id = e.file_name().to_string_lossy().into_owned();
            let dir = e.path();
            if !valid_task_id(&id) || dir.join("record.json").exists() {
                continue;
            }
            let Ok(spec) = Self::json::<TaskSpec>(&dir.join("spec.json")) else {
                // Cut off before its spec was stored: nothing to tell.
                tracing::warn!(task = %id, "removing a task directory without a spec");
                let _ = std::fs::remove_dir_all(&dir);
                continue;
            };
            let baseline = Self::json::<Baseline>(&dir.join("baseline.json")).unwrap_or_default();
            let created_ms = e
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as i64);
            let record = TaskRecord {
                id: id.clone(),
                spec,
                created_ms,
                baseline_digest: baseline.digest(),
                baseline_files: baseline.workspace_entries(),
                agent: None,
                verdict: Verdict::ExtractionFailed {
                    reason: INTERRUPTED.into(),
                },
                changes: vec![],
                not_carried: vec![],
                changeset_digest: None,
                verify: None,
                timings: Default::default(),
                error: Some(INTERRUPTED.into()),
                signature: None,
            };
            // A changeset (and its attestation) stored before the cut is not vouched for by any
            // record.
            let _ = std::fs::remove_file(dir.join("changeset.bin"));
            let _ = std::fs::remove_file(dir.join(ATTESTATION));
            Self::store_record(&dir, &record)?;
            tracing::warn!(task = %id, "task {INTERRUPTED}");
            interrupted.push(id);
        }
        let sandboxes = self
            .manager
            .list(&ListFilter::default())
            .await
            .map_err(TaskError::Sandboxes)?;
        for sb in sandboxes {
            if let Some(task) = sb.spec.labels.get(TASK_LABEL) {
                tracing::info!(sandbox = %sb.id, task = %task, "removing a task sandbox left by the last daemon");
                self.destroy(&sb.id).await;
            }
        }
        Ok(interrupted)
    }

    /// Runs `read` (file reads, hashing) on this task store off the async workers.
    async fn reading<T, F>(&self, read: F) -> Result<T, TaskError>
    where
        T: Send + 'static,
        F: FnOnce(&Tasks) -> Result<T, TaskError> + Send + 'static,
    {
        let tasks = self.clone();
        off_worker(move || read(&tasks)).await
    }

    /// Checks a stored task against its attestation (the one thing that vouches for it): the
    /// envelope's signatures by this host's key and the sandbox key it certified, the stored
    /// baseline and changeset against the attested digests, and the record's attested facts
    /// ([`attest::check_task`]).
    pub async fn verify_signature(&self, id: &str) -> Result<SignatureCheck, TaskError> {
        let id = id.to_owned();
        self.reading(move |t| t.check_attestation(&id)).await
    }

    fn check_attestation(&self, id: &str) -> Result<SignatureCheck, TaskError> {
        let dir = self.task_dir(id)?;
        let record: TaskRecord = Self::json(&dir.join("record.json"))?;
        let envelope = match self.read_attestation(id) {
            Ok(e) => Some(e),
            Err(TaskError::Unattested(_) | TaskError::Legacy(_)) => None,
            Err(e) => return Err(e),
        };
        if envelope.is_none() && record.signature.is_none() {
            return Ok(SignatureCheck::Missing);
        }
        // A task cut off before its baseline was stored is recorded with the empty one's.
        let baseline = Self::json::<Baseline>(&dir.join("baseline.json"))
            .unwrap_or_default()
            .digest();
        let path = dir.join("changeset.bin");
        let changeset = if path.exists() {
            Some(Self::read(&path)?)
        } else {
            None
        };
        let key = self.key()?;
        let checked = attest::check_task(
            envelope.as_ref(),
            &key.public_bytes(),
            &record,
            &baseline,
            changeset.as_deref(),
        );
        Ok(match checked {
            Ok(_) => SignatureCheck::Ok {
                public_key: key.public_hex(),
            },
            Err(reasons) => SignatureCheck::Bad {
                reason: reasons.join("; "),
            },
        })
    }

    /// The task's attestation (a DSSE envelope), as stored.
    pub async fn attestation(&self, id: &str) -> Result<Envelope, TaskError> {
        let id = id.to_owned();
        self.reading(move |t| t.read_attestation(&id)).await
    }

    fn read_attestation(&self, id: &str) -> Result<Envelope, TaskError> {
        let dir = self.task_dir(id)?;
        let path = dir.join(ATTESTATION);
        if !path.exists() {
            let record: TaskRecord = Self::json(&dir.join("record.json"))?;
            return Err(match record.signature {
                Some(_) => TaskError::Legacy(id.into()),
                None => TaskError::Unattested(id.into()),
            });
        }
        Self::json(&path)
    }

    /// Destroys a task sandbox and seals its journal.
    async fn destroy(&self, id: &str) {
        if let Err(e) = self.manager.destroy(id).await {
            tracing::warn!(sandbox = id, error = %chain(&e), "destroying a task sandbox failed");
        }
        if let Some(j) = self.journals.get() {
            let seal = Event::new(kinds::SEAL).attr(attr::SEAL_REASON, "task done");
            j.seal(id, seal).await;
        }
    }

    /// Runs the task's command `req` as `run` says, journalled like any exec of the sandbox
    /// (`exec.start`, `exec.end` with its exit, output digests and session recording), its
    /// output kept up to [`OUTPUT_CAP`] and sent to `sink` as it comes.
    async fn run_journalled(
        &self,
        channel: &Channel,
        run: Journalled<'_>,
        req: ExecRequest,
        sink: Option<&OutputSink>,
    ) -> Result<Collected, ExecError> {
        let tap = match self.journals.get() {
            Some(j) => {
                let actor = task_actor(run.task);
                j.exec_tap(run.info, Some(&actor), run.operation, &req, run.env)
                    .await
            }
            None => None,
        };
        let observe = |n: usize, data: &[u8]| {
            if let Some(tap) = &tap {
                tap.record(n, data);
            }
        };
        let result =
            run_capped_observed(channel, req, None, OUTPUT_CAP, OverCap::Drop, sink, observe).await;
        if let Some(mut tap) = tap {
            tap.end_capped(&result);
        }
        result
    }

    /// Copies the workspace and the helper into a sandbox.
    async fn prepare(
        channel: &Channel,
        tar: &[u8],
        extra: &[(&str, &[u8])],
    ) -> Result<(), StepError> {
        let script = format!("mkdir -p {GUEST_WORKSPACE} && exec tar -x -p --no-same-owner -C {GUEST_WORKSPACE} -f -");
        let req = ExecRequest {
            stdin: true,
            ..ExecRequest::shell(&script)
        };
        let c = run_capped(
            channel,
            req,
            Some(tar.to_vec()),
            64 << 10,
            OverCap::Kill,
            None,
        )
        .await?;
        if c.status != ExitStatus::Code(0) {
            return Err(StepError::Guest {
                what: "unpacking the workspace",
                status: c.status,
                stderr: excerpt(&c.stderr),
            });
        }
        let files = [(HELPER, hutch_task::GUEST_SCRIPT.as_bytes())]
            .into_iter()
            .chain(extra.iter().copied());
        for (path, data) in files {
            let req = WriteFileRequest {
                path: path.into(),
                mode: 0o644,
                make_parents: true,
            };
            channel.write_file(req, data).await?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn agent_steps(
        &self,
        sandbox: &str,
        spec: &TaskSpec,
        tar: &[u8],
        baseline_json: &[u8],
        baseline: &Baseline,
        record: &mut TaskRecord,
        sink: Option<&OutputSink>,
    ) -> Result<Option<Changeset>, StepError> {
        let channel = self.manager.channel(sandbox).await?;
        let t = Instant::now();
        Self::prepare(&channel, tar, &[(GUEST_BASELINE, baseline_json)]).await?;
        record.timings.copy_in_ms = ms(t);

        let t = Instant::now();
        let info = self.manager.get(sandbox).await?;
        let req = ExecRequest {
            env: self.manager.exec_env(&info.spec, spec.env.clone()),
            cwd: Some(GUEST_WORKSPACE.into()),
            timeout_ms: Some(spec.timeout_secs.saturating_mul(1000)),
            ..ExecRequest::new(spec.command.clone())
        };
        let run = Journalled {
            info: &info,
            task: &record.id,
            operation: AGENT_OPERATION,
            env: &spec.env,
        };
        let agent = self.run_journalled(&channel, run, req, sink).await?;
        record.agent = Some(outcome(&agent, t));
        record.timings.agent_ms = ms(t);

        let t = Instant::now();
        let l = spec.limits;
        let argv = [
            "python3",
            HELPER,
            "diff",
            GUEST_WORKSPACE,
            GUEST_BASELINE,
            &l.max_files.to_string(),
            &l.max_file_bytes.to_string(),
        ];
        let req = ExecRequest::new(argv.map(String::from).to_vec());
        let cap =
            (l.max_total_bytes + hutch_task::changeset::MAX_MANIFEST + (l.max_files + 1) * 8 + 64)
                as usize;
        let out = run_capped(&channel, req, None, cap, OverCap::Kill, None).await?;
        let result = if out.truncated() {
            record.verdict = Verdict::ExtractionFailed {
                reason: format!("the changeset stream is over {cap} bytes"),
            };
            None
        } else if out.status != ExitStatus::Code(0) {
            record.verdict = Verdict::ExtractionFailed {
                reason: format!(
                    "the guest helper failed ({:?}): {}",
                    out.status,
                    excerpt(&out.stderr)
                ),
            };
            None
        } else {
            // Checking up to a GiB of changes against the baseline: off the async workers.
            let (baseline, policy) = (baseline.clone(), spec.policy());
            let r = off_worker(move || validate(&out.stdout, &baseline, &policy)).await;
            record.verdict = Verdict::of(&r);
            match r {
                Ok(cs) => {
                    record.changes = cs.changes.clone();
                    record.not_carried = cs.not_carried.clone();
                    Some(cs)
                }
                Err(_) => None,
            }
        };
        record.timings.changeset_ms = ms(t);
        Ok(result)
    }

    async fn verify(
        &self,
        id: &str,
        spec: &TaskSpec,
        cmd: &str,
        tar: &[u8],
        stream: Option<Vec<u8>>,
        sink: Option<&OutputSink>,
    ) -> Result<VerifyOutcome, StepError> {
        let sb = SandboxSpec {
            template: spec.template.clone(),
            network: NetworkPolicy::None,
            labels: [(TASK_LABEL.to_string(), id.to_string())].into(),
            ..Default::default()
        };
        let info = self.create_sandbox(id, sb).await?;
        let r = async {
            let channel = self.manager.channel(&info.id).await?;
            let extra: Vec<(&str, &[u8])> = stream
                .iter()
                .map(|s| (GUEST_CHANGESET, s.as_slice()))
                .collect();
            Self::prepare(&channel, tar, &extra).await?;
            if stream.is_some() {
                let argv = ["python3", HELPER, "apply", GUEST_WORKSPACE, GUEST_CHANGESET];
                let req = ExecRequest::new(argv.map(String::from).to_vec());
                let c = run_capped(&channel, req, None, 64 << 10, OverCap::Kill, None).await?;
                if c.status != ExitStatus::Code(0) {
                    return Err(StepError::Guest {
                        what: "applying the changeset",
                        status: c.status,
                        stderr: excerpt(&c.stderr),
                    });
                }
            }
            let t = Instant::now();
            let req = ExecRequest {
                env: spec.env.clone().into_iter().collect(),
                cwd: Some(GUEST_WORKSPACE.into()),
                timeout_ms: Some(spec.timeout_secs.saturating_mul(1000)),
                ..ExecRequest::shell(cmd)
            };
            let run = Journalled {
                info: &info,
                task: id,
                operation: VERIFY_OPERATION,
                env: &spec.env,
            };
            let c = self.run_journalled(&channel, run, req, sink).await?;
            let process = outcome(&c, t);
            Ok(VerifyOutcome {
                command: cmd.to_string(),
                passed: process.succeeded(),
                process,
            })
        }
        .await;
        self.journal(&info.id, verify_event(id, &r)).await;
        self.destroy(&info.id).await;
        r
    }

    /// Every stored task, oldest first.
    pub async fn list(&self) -> Result<Vec<TaskRecord>, TaskError> {
        self.reading(Tasks::records).await
    }

    fn records(&self) -> Result<Vec<TaskRecord>, TaskError> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(source) => {
                return Err(TaskError::Store {
                    path: self.dir.clone(),
                    source,
                })
            }
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if valid_task_id(&name) && e.path().join("record.json").exists() {
                out.push(Self::json::<TaskRecord>(&e.path().join("record.json"))?);
            }
        }
        out.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        Ok(out)
    }

    /// One task's record.
    pub async fn get(&self, id: &str) -> Result<TaskRecord, TaskError> {
        let id = id.to_owned();
        self.reading(move |t| Self::json(&t.task_dir(&id)?.join("record.json")))
            .await
    }

    /// The task's baseline (what `apply` checks the host against).
    pub async fn baseline(&self, id: &str) -> Result<Baseline, TaskError> {
        let id = id.to_owned();
        self.reading(move |t| Self::json(&t.task_dir(&id)?.join("baseline.json")))
            .await
    }

    /// The accepted changeset's stream (validate it again before use).
    pub async fn changeset(&self, id: &str) -> Result<Vec<u8>, TaskError> {
        let id = id.to_owned();
        self.reading(move |t| {
            let path = t.task_dir(&id)?.join("changeset.bin");
            if !path.exists() {
                return Err(TaskError::NoChangeset(id));
            }
            Self::read(&path)
        })
        .await
    }

    /// The accepted changeset as a unified diff against the baseline (empty when there are
    /// no changes).
    pub async fn diff(&self, id: &str) -> Result<String, TaskError> {
        let id = id.to_owned();
        self.reading(move |t| t.stored_diff(&id)).await
    }

    fn stored_diff(&self, id: &str) -> Result<String, TaskError> {
        let dir = self.task_dir(id)?;
        let record: TaskRecord = Self::json(&dir.join("record.json"))?;
        if !dir.join("changeset.bin").exists() {
            return match record.verdict {
                Verdict::Empty => Ok(String::new()),
                _ => Err(TaskError::NoChangeset(id.into())),
            };
        }
        let baseline: Baseline = Self::json(&dir.join("baseline.json"))?;
        let stream = Self::read(&dir.join("changeset.bin"))?;
        let cs = validate(&stream, &baseline, &record.spec.policy()).map_err(|r| {
            TaskError::Spec(format!(
                "the stored changeset no longer validates: {}",
                r[0]
            ))
        })?;
        let wanted = cs
            .changes
            .iter()
            .filter_map(|c| match c {
                Change::Write {
                    path, added: false, ..
                }
                | Change::Delete { path } => Some(path.clone()),
                _ => None,
            })
            .collect();
        let tar = Self::read(&dir.join("workspace.tar"))?;
        let base = tar_files(&tar, &wanted).map_err(TaskError::Archive)?;
        let modes: BTreeMap<String, u32> = baseline
            .entries
            .iter()
            .filter_map(|(p, e)| match e {
                BaseEntry::File { mode, .. } => Some((p.clone(), *mode)),
                BaseEntry::Symlink { .. } | BaseEntry::Dir => None,
            })
            .collect();
        Ok(hutch_task::diff::unified(&cs, &base, &modes))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use hutch_store::SqliteStore;

    use super::*;
    use crate::{Limits, ManagerConfig};

    fn tasks(dir: &Path) -> Tasks {
        let store = Arc::new(SqliteStore::open(&dir.join("s.db")).unwrap());
        let cfg = ManagerConfig {
            images: Arc::new(crate::ImageDir::new(dir.join("images"))),
            runs_dir: dir.join("vms"),
            limits: Limits {
                max_sandboxes: 1,
                memory_budget_mib: 1024,
            },
            templates: crate::Templates::new(dir.join("templates"), dir.join("shm")),
            snapshots_dir: dir.join("snapshots"),
            boot_timeout: Duration::from_secs(1),
            jails_dir: None,
            detached: true,
            secrets: None,
        };
        let vmm = Arc::new(hutch_vmm::QemuVmm::with_binary(
            "/nonexistent".into(),
            hutch_vmm::Accel::Tcg,
        ));
        let manager = Manager::new(cfg, store, vmm, Err("not in unit tests".into()));
        Tasks::new(dir.join("tasks"), manager)
    }

    #[tokio::test]
    async fn tasks_cut_off_by_a_restart_are_stored_failed_and_unattested() {
        let home = tempfile::tempdir().unwrap();
        let t = tasks(home.path());
        let cut = home.path().join("tasks/task-00000000aa");
        std::fs::create_dir_all(&cut).unwrap();
        std::fs::write(cut.join("spec.json"), r#"{"command":["sleep","9"]}"#).unwrap();
        std::fs::write(cut.join("changeset.bin"), b"half a stream").unwrap();
        std::fs::write(cut.join(ATTESTATION), b"{}").unwrap();
        let early = home.path().join("tasks/task-00000000bb");
        std::fs::create_dir_all(&early).unwrap();

        assert_eq!(t.recover().await.unwrap(), ["task-00000000aa"]);
        let r = t.get("task-00000000aa").await.unwrap();
        assert_eq!(r.error.as_deref(), Some(INTERRUPTED));
        assert_eq!(
            r.verdict,
            Verdict::ExtractionFailed {
                reason: INTERRUPTED.into()
            }
        );
        assert_eq!(r.signature, None, "records are not signed");
        // Nothing vouches for it: its sandbox never attested anything.
        assert_eq!(
            t.verify_signature("task-00000000aa").await.unwrap(),
            SignatureCheck::Missing
        );
        assert!(matches!(
            t.attestation("task-00000000aa").await,
            Err(TaskError::Unattested(_))
        ));
        assert!(
            !cut.join("changeset.bin").exists() && !cut.join(ATTESTATION).exists(),
            "an unvouched changeset is dropped"
        );
        assert!(
            !early.exists(),
            "a directory cut off before its spec is removed"
        );
        // Recovered once: a second start finds nothing to do.
        assert!(t.recover().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_record_an_older_hutch_signed_is_refused_with_the_reason() {
        let home = tempfile::tempdir().unwrap();
        let t = tasks(home.path());
        let dir = home.path().join("tasks/task-00000000cc");
        std::fs::create_dir_all(&dir).unwrap();
        let record = TaskRecord {
            id: "task-00000000cc".into(),
            spec: serde_json::from_str(r#"{"command":["true"]}"#).unwrap(),
            created_ms: 1,
            baseline_digest: Baseline::default().digest(),
            baseline_files: 0,
            agent: None,
            verdict: Verdict::Accepted { changes: 1 },
            changes: vec![],
            not_carried: vec![],
            changeset_digest: Some(sha256_hex(b"stream")),
            verify: None,
            timings: Default::default(),
            error: None,
            signature: Some("ab".repeat(64)),
        };
        std::fs::write(
            dir.join("record.json"),
            serde_json::to_vec(&record).unwrap(),
        )
        .unwrap();
        std::fs::write(dir.join("changeset.bin"), b"stream").unwrap();
        let SignatureCheck::Bad { reason } = t.verify_signature(&record.id).await.unwrap() else {
            panic!("an old record verifies");
        };
        assert_eq!(reason, attest::LEGACY_RECORD);
        let refused = t.attestation(&record.id).await.unwrap_err();
        assert!(matches!(refused, TaskError::Legacy(_)));
        assert!(
            refused.to_string().contains("run the task again"),
            "{refused}"
        );
    }
}
