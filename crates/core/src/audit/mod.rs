//! The journals of this host's sandboxes ([`Journals`]): one tamper-evident
//! [`hutch_journal::Journal`] per sandbox, started with its create record, appended to by the
//! request surface (every action with its [`Caller`](crate::service::Caller)), sealed when the
//! sandbox is destroyed, kept after it is gone. Other parts (the secret broker, workload
//! identity, the network log) append through [`GuestFeed`], bounded against a hostile guest.
//! Every secret value of the host's store is redacted from every journal ([`Journals::redact`]).

mod feed;

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    path::PathBuf,
    sync::Arc,
    time::Instant,
};

use async_trait::async_trait;
use futures::StreamExt;
use hutch_journal::{
    attr, read_records, verify_dir, Actor, AuditLog, Event, HostSigner, Journal, JournalError,
    LiveSecrets, Options, Recorder, Recordings, Redactor, Report,
};
use hutch_protocol::{ExecRequest, ExitStatus};
use hutch_types::SandboxInfo;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

pub use feed::{broker_event, flow_event, FeedLimits, GuestFeed, SUMMARY_EVERY, SUPPRESSED};

use crate::{
    blocking::off_worker,
    exec::{Collected, ExecError},
    service::ByteStream,
};

/// Secret values shorter than this are not redacted: they are too common to take out of every
/// record (and would take attribute names apart).
pub const REDACT_MIN_LEN: usize = 8;

/// The pipe between a transfer and its client, when a tally sits between them.
const PIPE_BYTES: usize = 64 * 1024;

/// The host's task-signing key as the journals' certifier.
pub struct HostKeySigner(pub hutch_task::sign::HostKey);

impl HostSigner for HostKeySigner {
    fn public_key(&self) -> [u8; 32] {
        self.0.public_bytes()
    }

    fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign_bytes(message)
    }
}

/// A sandbox's identity key as its journal's first record certifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The public key.
    pub public: [u8; 32],
    /// The host key's certificate of it (hex).
    pub certificate: String,
}

/// Anything that appends to sandboxes' journals.
#[async_trait]
pub trait JournalSink: Send + Sync {
    /// Appends `event` to the journal of `sandbox` (dropped, with a warning, if it has none or
    /// it is sealed).
    async fn record(&self, sandbox: &str, event: Event);
}

/// Which records to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Only records with `seq` at or above this.
    pub from: u64,
    /// Only records of this kind (or of kinds starting with it and a dot: `exec` takes
    /// `exec.start` and `exec.end`).
    pub kind: Option<String>,
}

/// The journals under one directory (`$HUTCH_HOME/journal`), one subdirectory per sandbox.
pub struct Journals {
    root: PathBuf,
    host: Arc<dyn HostSigner>,
    opts: Options,
    open: tokio::sync::Mutex<HashMap<String, Journal>>,
    live: LiveSecrets,
    /// The execs' session recordings, beside their journals (`crate::recording`).
    pub(crate) recordings: Recordings,
}

impl Journals {
    /// The journals under `root`, sandbox keys certified by `host`.
    pub fn new(root: PathBuf, host: Arc<dyn HostSigner>) -> Journals {
        Journals {
            root,
            host,
            opts: Options::default(),
            open: tokio::sync::Mutex::new(HashMap::new()),
            live: LiveSecrets::default(),
            recordings: Recordings::new(hutch_journal::recording::DEFAULT_CAP),
        }
    }

    /// Redacts `values` (the host's secrets: all of them when the daemon starts, each new one
    /// as it is set or rotated) from every record written from now on, in every journal.
    pub fn redact(&self, values: impl IntoIterator<Item = String>) {
        self.live
            .add(values.into_iter().filter(|v| v.len() >= REDACT_MIN_LEN));
    }

    /// The redactor of the sandbox `info` (its spec's values and the host's secrets).
    pub(crate) fn redactor(&self, info: Option<&SandboxInfo>) -> Redactor {
        info.map(redactor)
            .unwrap_or_default()
            .with_live(self.live.clone())
    }

    /// The journal of `sandbox` if it is open now.
    pub async fn opened(&self, sandbox: &str) -> Option<Journal> {
        self.open.lock().await.get(sandbox).cloned()
    }

    /// The same, checkpointing by `opts` (tests and benchmarks).
    pub fn with_options(mut self, opts: Options) -> Journals {
        self.opts = opts;
        self
    }

    /// The host key that certifies sandbox keys.
    pub fn host_key(&self) -> [u8; 32] {
        self.host.public_key()
    }

    /// The directory of `sandbox`'s journal.
    pub fn dir(&self, sandbox: &str) -> PathBuf {
        self.root.join(sandbox)
    }

    /// Starts the journal of the new sandbox `info` with `first` (its create record); secret
    /// values of its spec are redacted from every record.
    pub async fn start(&self, info: &SandboxInfo, first: Event) {
        let made = Journal::create(
            self.dir(&info.id),
            info.id.clone(),
            self.host.clone(),
            first,
            self.redactor(Some(info)),
            self.opts,
        )
        .await;
        match made {
            Ok(journal) => {
                self.open.lock().await.insert(info.id.clone(), journal);
            }
            Err(e) => tracing::warn!(sandbox = %info.id, error = %e, "no journal"),
        }
    }

    /// The open journal of `sandbox`, continuing it from disk after a restart (a torn tail
    /// recorded); `None` when it has none or it is sealed.
    pub async fn journal(&self, sandbox: &str, redact: Option<&SandboxInfo>) -> Option<Journal> {
        let mut open = self.open.lock().await;
        if let Some(j) = open.get(sandbox) {
            return Some(j.clone());
        }
        let redactor = self.redactor(redact);
        match Journal::open(self.dir(sandbox), redactor, self.opts).await {
            Ok(j) => {
                open.insert(sandbox.to_string(), j.clone());
                Some(j)
            }
            Err(JournalError::Sealed | JournalError::State { .. }) => None,
            Err(e) => {
                tracing::warn!(sandbox, error = %e, "journal cannot be continued");
                None
            }
        }
    }

    /// The journal tap of an exec of the sandbox `info` (`operation`, asked by `actor`; `env`:
    /// the request's own variables), recording its session: none when its journal is sealed.
    pub async fn exec_tap(
        &self,
        info: &SandboxInfo,
        actor: Option<&Actor>,
        operation: &str,
        req: &ExecRequest,
        env: &BTreeMap<String, String>,
    ) -> Option<ExecTap> {
        let journal = self.journal(&info.id, Some(info)).await?;
        let tap = ExecTap::start(journal, actor, operation, req, env);
        Some(tap.recorded(self.recorder(info, req.tty, env)))
    }

    /// Appends `last` as the seal of `sandbox`'s journal: its final checkpoint.
    pub async fn seal(&self, sandbox: &str, last: Event) -> Option<String> {
        let journal = self.journal(sandbox, None).await?;
        self.open.lock().await.remove(sandbox);
        match journal.seal(last).await {
            Ok(note) => Some(note),
            Err(e) => {
                tracing::warn!(sandbox, error = %e, "sealing the journal failed");
                None
            }
        }
    }

    /// `sandbox`'s open journal (not sealed), or [`JournalError::Sealed`].
    async fn open_journal(&self, sandbox: &str) -> Result<Journal, JournalError> {
        let journal = self.open.lock().await.get(sandbox).cloned();
        journal.ok_or(JournalError::Sealed)
    }

    /// The identity key of `sandbox` as its journal's first record certifies it.
    pub async fn identity(&self, sandbox: &str) -> Result<Identity, JournalError> {
        let dir = self.dir(sandbox);
        off_worker(move || {
            let first = read_records(&dir, 0)?.into_iter().next();
            let attr = |name: &str| {
                first
                    .as_ref()
                    .and_then(|r| r.attrs.get(name))
                    .and_then(Value::as_str)
                    .map(String::from)
            };
            let public = attr(attr::JOURNAL_PUBLIC_KEY)
                .and_then(|k| hex::decode(k).ok())
                .and_then(|b| <[u8; 32]>::try_from(b).ok());
            match (public, attr(attr::JOURNAL_CERTIFICATE)) {
                (Some(public), Some(certificate)) => Ok(Identity {
                    public,
                    certificate,
                }),
                _ => Err(JournalError::State {
                    path: dir,
                    why: "its first record certifies no sandbox key",
                }),
            }
        })
        .await
    }

    /// Writes a checkpoint of `sandbox`'s open journal now: its signed note.
    pub async fn checkpoint_note(&self, sandbox: &str) -> Result<String, JournalError> {
        self.open_journal(sandbox).await?.checkpoint().await
    }

    /// Signs the DSSE encoding `pae` with `sandbox`'s identity key (recorded in its journal;
    /// only before the seal, which destroys the key).
    pub async fn sign_dsse(&self, sandbox: &str, pae: Vec<u8>) -> Result<[u8; 64], JournalError> {
        let (_, signature) = self.open_journal(sandbox).await?.sign_dsse(pae).await?;
        Ok(signature)
    }

    /// Writes a checkpoint of `sandbox`'s open journal now (a stop, a pause to disk).
    pub async fn checkpoint(&self, sandbox: &str) {
        let journal = self.open.lock().await.get(sandbox).cloned();
        if let Some(j) = journal {
            if let Err(e) = j.checkpoint().await {
                tracing::warn!(sandbox, error = %e, "journal checkpoint failed");
            }
        }
    }

    /// The records of `sandbox`'s journal that `query` asks for, once what was appended
    /// before is written.
    pub async fn read(&self, sandbox: &str, query: AuditQuery) -> Result<AuditLog, JournalError> {
        let journal = self.open.lock().await.get(sandbox).cloned();
        if let Some(j) = &journal {
            j.sync().await?;
        }
        let dir = self.dir(sandbox);
        let (records, file_note) = off_worker(move || {
            let records = read_records(&dir, query.from)?;
            let note = std::fs::read_to_string(dir.join(hutch_journal::CHECKPOINT_FILE)).ok();
            Ok::<_, JournalError>((records, note))
        })
        .await?;
        let records = records
            .into_iter()
            .filter(|r| query.kind.as_ref().is_none_or(|k| kind_matches(&r.kind, k)))
            .collect();
        Ok(AuditLog {
            records,
            checkpoint: journal.and_then(|j| j.latest_checkpoint()).or(file_note),
            host_key: hex::encode(self.host_key()),
        })
    }

    /// Verifies `sandbox`'s journal against this host's key.
    pub async fn verify(&self, sandbox: &str) -> Result<Report, JournalError> {
        let journal = self.open.lock().await.get(sandbox).cloned();
        if let Some(j) = journal {
            j.sync().await?;
        }
        let (dir, host) = (self.dir(sandbox), self.host_key());
        off_worker(move || verify_dir(&dir, &host)).await
    }

    /// The latest checkpoint of `sandbox`'s journal (open, or as last written: sealed).
    pub async fn latest_checkpoint(&self, sandbox: &str) -> Option<String> {
        let journal = self.open.lock().await.get(sandbox).cloned();
        if let Some(note) = journal.and_then(|j| j.latest_checkpoint()) {
            return Some(note);
        }
        let path = self.dir(sandbox).join(hutch_journal::CHECKPOINT_FILE);
        off_worker(move || std::fs::read_to_string(path).ok()).await
    }

    /// Removes sealed journals last written more than `keep` ago: their sandbox ids.
    pub async fn prune(&self, keep: std::time::Duration) -> Result<Vec<String>, JournalError> {
        let root = self.root.clone();
        off_worker(move || hutch_journal::prune(&root, keep)).await
    }
}

#[async_trait]
impl JournalSink for Journals {
    async fn record(&self, sandbox: &str, event: Event) {
        match self.journal(sandbox, None).await {
            Some(j) => j.append(event),
            None => tracing::warn!(sandbox, kind = %event.kind, "no open journal: event dropped"),
        }
    }
}

/// Whether a record of kind `kind` is asked for by `asked` (itself, or a kind below it).
fn kind_matches(kind: &str, asked: &str) -> bool {
    kind == asked
        || kind
            .strip_prefix(asked)
            .is_some_and(|rest| rest.starts_with('.'))
}

/// The secret values of a sandbox's spec: WireGuard keys, and environment values of 8 bytes
/// or more (shorter ones are too common to take out of every record).
fn redactor(info: &SandboxInfo) -> Redactor {
    let spec = &info.spec;
    let wireguard = spec
        .wireguard
        .iter()
        .flat_map(|w| std::iter::once(w.private_key.clone()).chain(w.preshared_key.clone()));
    let env = spec
        .env
        .values()
        .filter(|v| v.len() >= REDACT_MIN_LEN)
        .cloned();
    Redactor::new(wireguard.chain(env))
}

/// The create record of `info` (the spec, without secret values: variable names only).
pub fn create_event(
    info: &SandboxInfo,
    actor: Option<&Actor>,
    image_digest: Option<&str>,
) -> Event {
    let spec = &info.spec;
    let mut event = Event::new("sandbox.create")
        .by(actor)
        .attr("hutch.sandbox.image", spec.image.clone())
        .attr("hutch.sandbox.cpus", spec.cpus)
        .attr("hutch.sandbox.memory_mib", spec.memory_mib)
        .attr("hutch.sandbox.disk_mib", spec.disk_mib)
        .attr(
            "hutch.sandbox.network",
            serde_json::to_value(&spec.network).unwrap_or(Value::Null),
        )
        .attr(
            "hutch.sandbox.env_names",
            spec.env.keys().cloned().collect::<Vec<_>>(),
        )
        .attr(
            "hutch.sandbox.labels",
            serde_json::to_value(&spec.labels).unwrap_or(Value::Null),
        )
        .attr("hutch.sandbox.wireguard", spec.wireguard.is_some());
    if let Some(digest) = image_digest {
        event = event.attr("hutch.image.digest", digest);
    }
    if let Some(ttl) = spec.ttl_secs {
        event = event.attr("hutch.sandbox.ttl_secs", ttl);
    }
    if let Some(origin) = &spec.origin {
        if let Some(t) = &origin.template {
            event = event.attr("hutch.sandbox.template", t.clone());
        }
        if let Some(p) = &origin.parent {
            event = event.attr("hutch.sandbox.parent", p.clone());
        }
    }
    event
}

/// Records one process run: `exec.start` at once, `exec.end` with how it ended, how long it
/// ran and the count and BLAKE3 of each output stream; a tap dropped before the end records
/// an `exec.end` marked abandoned (the process is killed then).
pub struct ExecTap {
    journal: Journal,
    actor: Option<Actor>,
    started: Instant,
    streams: [(u64, blake3::Hasher); 2],
    ended: bool,
    /// The exec's id in both its records.
    id: String,
    /// Its session recording, named in its end record.
    recorder: Option<Recorder>,
}

impl ExecTap {
    /// Records the start of `req` (`operation`: `exec`, `exec_stream`, `put_archive`, …);
    /// values of `env` (the request's own variables) are redacted from it.
    pub fn start(
        journal: Journal,
        actor: Option<&Actor>,
        operation: &str,
        req: &ExecRequest,
        env: &BTreeMap<String, String>,
    ) -> ExecTap {
        let mut attrs = Value::Object(
            Event::new("")
                .attr(attr::PROCESS_COMMAND_ARGS, req.argv.clone())
                .attrs,
        );
        Redactor::new(env.values().cloned()).redact(&mut attrs);
        let Value::Object(attrs) = attrs else {
            unreachable!("an object stays an object")
        };
        let mut event = Event {
            attrs,
            ..Event::new("exec.start").by(actor)
        }
        .attr(attr::OPERATION, operation)
        .attr(
            attr::PROCESS_ENV_NAMES,
            req.env.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
        )
        .attr(attr::PROCESS_TTY, req.tty.is_some());
        let id = format!("{:012x}", rand::random::<u64>() >> 16);
        event = event.attr(attr::EXEC_ID, id.clone());
        if let Some(cwd) = &req.cwd {
            event = event.attr(attr::PROCESS_WORKING_DIRECTORY, cwd.clone());
        }
        journal.append(event);
        ExecTap {
            journal,
            actor: actor.cloned(),
            started: Instant::now(),
            streams: Default::default(),
            ended: false,
            id,
            recorder: None,
        }
    }

    /// The same tap, recording the session with `recorder` (see [`Journals::recorder`]).
    pub fn recorded(mut self, recorder: Recorder) -> ExecTap {
        self.recorder = Some(recorder);
        self
    }

    /// The session's recorder, for its input and resizes.
    pub fn recorder(&self) -> Option<Recorder> {
        self.recorder.clone()
    }

    /// Counts and hashes output of stream `n` (0 stdout, 1 stderr).
    pub fn output(&mut self, n: usize, data: &[u8]) {
        let (count, hasher) = &mut self.streams[n & 1];
        *count += data.len() as u64;
        hasher.update(data);
    }

    /// Records output of stream `n` in the session recording, as it comes (a capped exec
    /// counts only what it kept, but records all it saw).
    pub fn record(&self, n: usize, data: &[u8]) {
        if let Some(r) = &self.recorder {
            r.output(crate::recording::source(n), data);
        }
    }

    /// Records the end of a capped exec: how it ended and what it kept (or why it failed).
    pub fn end_capped(&mut self, result: &Result<Collected, ExecError>) {
        match result {
            Ok(c) => {
                self.output(0, &c.stdout);
                self.output(1, &c.stderr);
                let extra = Event::default()
                    .attr("hutch.process.stdout.dropped", c.dropped[0])
                    .attr("hutch.process.stderr.dropped", c.dropped[1])
                    .attr("hutch.process.timed_out", c.timed_out);
                self.end(Some(c.status), extra);
            }
            Err(e) => self.end(
                None,
                Event::default().attr(attr::ERROR_MESSAGE, e.to_string()),
            ),
        }
    }

    /// Records the end: `status` (none when it never came), plus `extra` attributes.
    pub fn end(&mut self, status: Option<ExitStatus>, extra: Event) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let mut event = Event::new("exec.end")
            .by(self.actor.as_ref())
            .attr(
                attr::PROCESS_DURATION_MS,
                self.started.elapsed().as_millis() as u64,
            )
            .attr(attr::STDOUT_BYTES, self.streams[0].0)
            .attr(
                attr::STDOUT_DIGEST,
                self.streams[0].1.finalize().to_hex().as_str(),
            )
            .attr(attr::STDERR_BYTES, self.streams[1].0)
            .attr(
                attr::STDERR_DIGEST,
                self.streams[1].1.finalize().to_hex().as_str(),
            );
        event = event.attr(attr::EXEC_ID, self.id.clone());
        if let Some(r) = &self.recorder {
            event = crate::recording::summary_attrs(event, &r.finish());
        }
        match status {
            Some(ExitStatus::Code(c)) => event = event.attr(attr::PROCESS_EXIT_CODE, c),
            Some(ExitStatus::Signal(s)) => event = event.attr(attr::PROCESS_EXIT_SIGNAL, s),
            None => {}
        }
        event.attrs.extend(extra.attrs);
        self.journal.append(event);
    }
}

impl Drop for ExecTap {
    fn drop(&mut self) {
        self.end(None, Event::new("").attr("hutch.process.abandoned", true));
    }
}

/// The count and BLAKE3 of bytes passing through a transfer, for its journal record.
#[derive(Clone, Default)]
pub struct Tally(Arc<std::sync::Mutex<(u64, blake3::Hasher)>>);

impl Tally {
    fn add(&self, data: &[u8]) {
        let mut t = self.0.lock().expect("tally");
        t.0 += data.len() as u64;
        t.1.update(data);
    }

    /// `body`, tallied as it is read.
    pub fn stream(&self, body: ByteStream) -> ByteStream {
        let me = self.clone();
        Box::pin(body.inspect(move |chunk| {
            if let Ok(bytes) = chunk {
                me.add(bytes);
            }
        }))
    }

    /// A pipe to write into instead of `sink`, and the pump that tallies what passes and
    /// forwards it (ending `sink` when the pipe's writer is gone). Back-pressure is kept: the
    /// pump writes no faster than `sink` is read.
    pub fn pipe(&self, mut sink: DuplexStream) -> (DuplexStream, impl Future<Output = ()>) {
        let (ours, mut from) = tokio::io::duplex(PIPE_BYTES);
        let me = self.clone();
        let pump = async move {
            let mut buf = vec![0u8; PIPE_BYTES];
            loop {
                let n = match from.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                me.add(&buf[..n]);
                if sink.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = sink.shutdown().await;
        };
        (ours, pump)
    }

    /// `event` with the transfer's direction, path, size and digest.
    pub fn attrs(&self, event: Event, direction: &str, path: &str) -> Event {
        let t = self.0.lock().expect("tally");
        event
            .attr(attr::FILE_DIRECTION, direction)
            .attr(attr::FILE_PATH, path)
            .attr(attr::FILE_SIZE, t.0)
            .attr(attr::FILE_DIGEST, t.1.finalize().to_hex().as_str())
    }
}
