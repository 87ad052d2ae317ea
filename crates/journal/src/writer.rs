//! The writer: one thread per journal owns its file, appends in batches, `fsync`s each batch
//! and before every checkpoint, signs checkpoints and seals. Callers only send it messages, so
//! appending never blocks (an async worker least of all).

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use ed25519_dalek::SigningKey;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use crate::{
    attr,
    chain::{self, Hash},
    key,
    note::{self, Checkpoint},
    time::rfc3339,
    Event, HostSigner, JournalError, Record, Redactor, JOURNAL_FILE, VERSION,
};

/// The latest checkpoint's note, beside the journal.
pub const CHECKPOINT_FILE: &str = "checkpoint";
/// The sandbox's identity key, until the seal.
pub const KEY_FILE: &str = "sandbox.key";

/// When the writer checkpoints.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// After this many lines since the last checkpoint.
    pub checkpoint_every: u64,
    /// After this long idle with lines not yet checkpointed.
    pub checkpoint_idle: Duration,
    /// At most this many appends per write and `fsync`.
    pub batch: usize,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            checkpoint_every: 4096,
            checkpoint_idle: Duration::from_secs(1),
            batch: 4096,
        }
    }
}

/// A reply to whoever asked for a checkpoint, seal or sync.
type Reply<T> = oneshot::Sender<Result<T, JournalError>>;

/// What the writer thread is asked to do.
enum Command {
    Append(Event),
    Sync(Reply<()>),
    Checkpoint(Reply<String>),
    Seal(Event, Reply<String>),
    SignDsse(Vec<u8>, Reply<Signed>),
}

/// A signature by the sandbox's identity key: the public key and the signature's bytes.
pub type Signed = ([u8; 32], [u8; 64]);

/// What every message the sandbox key may sign besides checkpoints starts with: a DSSE
/// pre-authentication encoding (`DSSEv1 <len> <type> <len> <body>`), never a note.
pub const DSSE_PREFIX: &[u8] = b"DSSEv1 ";

/// What callers and the writer share.
#[derive(Debug)]
struct Shared {
    latest: Mutex<Option<String>>,
    write_errors: AtomicU64,
}

/// An open journal: a handle on its writer thread. Clones share the writer; the thread ends
/// (after a last write and checkpoint) when every handle is gone, or after the seal.
#[derive(Debug, Clone)]
pub struct Journal {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

impl Journal {
    /// Makes the journal of `sandbox` in `dir` (which must not hold one): a fresh identity key,
    /// certified by `host` in `first`, the journal's first record.
    pub async fn create(
        dir: PathBuf,
        sandbox: String,
        host: Arc<dyn HostSigner>,
        first: Event,
        redactor: Redactor,
        opts: Options,
    ) -> Result<Journal, JournalError> {
        Journal::spawn(move || Writer::create(dir, sandbox, host.as_ref(), first, redactor, opts))
            .await
    }

    /// Continues the journal in `dir` (after a restart): a torn last line is cut off and
    /// recorded, then a `journal.reopen` record. [`JournalError::Sealed`] for a sealed one.
    pub async fn open(
        dir: PathBuf,
        redactor: Redactor,
        opts: Options,
    ) -> Result<Journal, JournalError> {
        Journal::spawn(move || Writer::open(dir, redactor, opts)).await
    }

    /// Starts the writer thread with what `setup` makes there (file I/O stays off the caller).
    async fn spawn(
        setup: impl FnOnce() -> Result<Writer, JournalError> + Send + 'static,
    ) -> Result<Journal, JournalError> {
        let (tx, rx) = mpsc::channel();
        let (ready, made) = oneshot::channel();
        let shared = Arc::new(Shared {
            latest: Mutex::new(None),
            write_errors: AtomicU64::new(0),
        });
        let theirs = shared.clone();
        std::thread::Builder::new()
            .name("hutch-journal".into())
            .spawn(move || match setup() {
                Ok(mut writer) => {
                    *theirs.latest.lock().expect("latest") = writer.latest_note();
                    writer.shared = Some(theirs);
                    let _ = ready.send(Ok(()));
                    writer.serve(rx);
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                }
            })
            .map_err(JournalError::io("journal writer thread"))?;
        made.await.map_err(|_| JournalError::Stopped)??;
        Ok(Journal { tx, shared })
    }

    /// Appends `event`; returns at once. Lost only if the writer has stopped (sealed, or a
    /// write failed: counted in [`Journal::write_errors`]).
    pub fn append(&self, event: Event) {
        if self.tx.send(Command::Append(event)).is_err() {
            self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits until everything appended so far is written and `fsync`ed.
    pub async fn sync(&self) -> Result<(), JournalError> {
        self.ask(Command::Sync).await
    }

    /// Writes a checkpoint over everything appended so far: its signed note.
    pub async fn checkpoint(&self) -> Result<String, JournalError> {
        self.ask(Command::Checkpoint).await
    }

    /// Appends `last` as the seal record, checkpoints it and destroys the key: the final note.
    pub async fn seal(&self, last: Event) -> Result<String, JournalError> {
        self.ask(|reply| Command::Seal(last, reply)).await
    }

    /// Signs `pae` (a DSSE pre-authentication encoding: it must start with [`DSSE_PREFIX`],
    /// so the key signs nothing that could pass for a checkpoint note) with the sandbox's
    /// identity key, recording the signature in the journal (`attestation.sign`, with the
    /// SHA-256 of what was signed). Only before the seal: the key is destroyed then.
    pub async fn sign_dsse(&self, pae: Vec<u8>) -> Result<Signed, JournalError> {
        if !pae.starts_with(DSSE_PREFIX) {
            return Err(JournalError::NotDsse);
        }
        self.ask(|reply| Command::SignDsse(pae, reply)).await
    }

    /// The latest checkpoint's signed note, if any was written.
    pub fn latest_checkpoint(&self) -> Option<String> {
        self.shared.latest.lock().expect("latest").clone()
    }

    /// Appends lost or writes that failed since the journal was opened.
    pub fn write_errors(&self) -> u64 {
        self.shared.write_errors.load(Ordering::Relaxed)
    }

    async fn ask<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, JournalError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(command(reply))
            .map_err(|_| JournalError::Stopped)?;
        answer.await.map_err(|_| JournalError::Stopped)?
    }
}

/// The writer thread's state.
struct Writer {
    dir: PathBuf,
    file: File,
    sandbox: String,
    origin: String,
    key: SigningKey,
    redactor: Redactor,
    opts: Options,
    /// The next line's seq.
    seq: u64,
    /// The last line's hash.
    head: Hash,
    /// Monotonic nanoseconds at `started`.
    mono_base: u64,
    started: Instant,
    /// Lines encoded but not yet written.
    pending: Vec<u8>,
    /// Lines since the last checkpoint.
    unchecked: u64,
    latest: Option<String>,
    shared: Option<Arc<Shared>>,
}

/// Opens the journal file for appending.
fn open_append(path: &Path, create: bool) -> Result<File, JournalError> {
    std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create_new(create)
        .mode(0o600)
        .open(path)
        .map_err(JournalError::io(path))
}

impl Writer {
    fn create(
        dir: PathBuf,
        sandbox: String,
        host: &dyn HostSigner,
        mut first: Event,
        redactor: Redactor,
        opts: Options,
    ) -> Result<Writer, JournalError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(JournalError::io(&dir))?;
        let path = dir.join(JOURNAL_FILE);
        if path.exists() {
            return Err(JournalError::State {
                path: dir,
                why: "a journal already exists there",
            });
        }
        let key = key::create(&dir.join(KEY_FILE))?;
        let public = key.verifying_key().to_bytes();
        let certificate = host.sign(&key::certificate_message(&sandbox, &public));
        first = first
            .attr(attr::JOURNAL_PUBLIC_KEY, hex::encode(public))
            .attr(attr::JOURNAL_HOST_KEY, hex::encode(host.public_key()))
            .attr(attr::JOURNAL_CERTIFICATE, hex::encode(certificate));
        let file = open_append(&path, true)?;
        let mut writer = Writer {
            origin: note::origin(&sandbox),
            head: chain::genesis(&sandbox),
            dir,
            file,
            sandbox,
            key,
            redactor,
            opts,
            seq: 0,
            mono_base: 0,
            started: Instant::now(),
            pending: Vec::new(),
            unchecked: 0,
            latest: None,
            shared: None,
        };
        writer.encode(first);
        writer.checkpoint()?;
        Ok(writer)
    }

    fn open(dir: PathBuf, redactor: Redactor, opts: Options) -> Result<Writer, JournalError> {
        let path = dir.join(JOURNAL_FILE);
        if !path.exists() {
            return Err(JournalError::State {
                path: dir,
                why: "there is no journal",
            });
        }
        let key = key::load(&dir.join(KEY_FILE))?;
        let mut file = open_append(&path, false)?;
        let mut bytes = Vec::new();
        file.seek(SeekFrom::Start(0))
            .and_then(|_| file.read_to_end(&mut bytes))
            .map_err(JournalError::io(&path))?;
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let torn = bytes.split_off(complete);
        if !torn.is_empty() {
            file.set_len(complete as u64)
                .and_then(|_| file.sync_all())
                .map_err(JournalError::io(&path))?;
        }
        let last_line = bytes[..complete.saturating_sub(1)]
            .rsplit(|&b| b == b'\n')
            .next()
            .unwrap_or_default();
        let last: Record =
            serde_json::from_slice(last_line).map_err(|_| JournalError::Damaged(dir.clone()))?;
        let latest = std::fs::read_to_string(dir.join(CHECKPOINT_FILE)).ok();
        let mut writer = Writer {
            origin: note::origin(&last.sandbox),
            head: chain::line_hash(last_line),
            file,
            sandbox: last.sandbox,
            key,
            redactor,
            opts,
            seq: last.seq + 1,
            mono_base: last.mono_ns,
            started: Instant::now(),
            pending: Vec::new(),
            unchecked: 0,
            latest,
            shared: None,
            dir,
        };
        if !torn.is_empty() {
            writer.encode(
                Event::new(crate::kinds::TORN_TAIL)
                    .attr(attr::TORN_BYTES, torn.len())
                    .attr(attr::TORN_DIGEST, chain::digest_hex(&torn)),
            );
        }
        writer.encode(Event::new(crate::kinds::REOPEN));
        writer.flush()?;
        Ok(writer)
    }

    fn latest_note(&self) -> Option<String> {
        self.latest.clone()
    }

    /// Serves commands until every handle is gone or the journal is sealed.
    fn serve(mut self, rx: mpsc::Receiver<Command>) {
        loop {
            let first = if self.unchecked > 0 {
                match rx.recv_timeout(self.opts.checkpoint_idle) {
                    Ok(c) => c,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        let checkpointed = self.checkpoint().map(drop);
                        self.report(checkpointed);
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(c) => c,
                    Err(_) => break,
                }
            };
            let mut next = Some(first);
            let mut taken = 0;
            while let Some(command) = next.take() {
                if !self.handle(command) {
                    return;
                }
                taken += 1;
                if taken < self.opts.batch {
                    next = rx.try_recv().ok();
                }
            }
            let flushed = self.flush();
            self.report(flushed);
            if self.unchecked >= self.opts.checkpoint_every {
                let checkpointed = self.checkpoint().map(drop);
                self.report(checkpointed);
            }
        }
        // Every handle is gone: what is pending goes out under a checkpoint.
        if self.unchecked > 0 {
            let last = self.checkpoint().map(drop);
            self.report(last);
        }
    }

    /// Handles one command; `false` once the journal is sealed.
    fn handle(&mut self, command: Command) -> bool {
        match command {
            Command::Append(event) => self.encode(event),
            Command::Sync(reply) => {
                let _ = reply.send(self.flush());
            }
            Command::Checkpoint(reply) => {
                let _ = reply.send(self.checkpoint());
            }
            Command::Seal(event, reply) => {
                self.encode(Event {
                    kind: crate::kinds::SEAL.into(),
                    ..event
                });
                let sealed = self
                    .checkpoint()
                    .and_then(|note| key::destroy(&self.dir.join(KEY_FILE)).map(|()| note));
                let _ = reply.send(sealed);
                return false;
            }
            Command::SignDsse(pae, reply) => {
                let signature = HostSigner::sign(&self.key, &pae);
                self.encode(
                    Event::new(crate::kinds::ATTESTATION_SIGN)
                        .attr(attr::ATTESTATION_DIGEST, hex::encode(Sha256::digest(&pae))),
                );
                let _ = reply.send(Ok((self.key.verifying_key().to_bytes(), signature)));
            }
        }
        true
    }

    fn report(&self, result: Result<(), JournalError>) {
        if let Err(e) = result {
            if let Some(shared) = &self.shared {
                shared.write_errors.fetch_add(1, Ordering::Relaxed);
            }
            tracing::warn!(sandbox = %self.sandbox, error = %e, "journal write failed");
        }
    }

    /// Encodes `event` as the next line (redacted), into the pending bytes.
    fn encode(&mut self, event: Event) {
        let mut attrs = Value::Object(event.attrs);
        self.redactor.redact(&mut attrs);
        let Value::Object(attrs) = attrs else {
            unreachable!("an object stays an object")
        };
        let record = Record {
            v: VERSION,
            seq: self.seq,
            prev: hex::encode(self.head),
            time: rfc3339(SystemTime::now()),
            mono_ns: self.mono_base + self.started.elapsed().as_nanos() as u64,
            sandbox: self.sandbox.clone(),
            kind: event.kind,
            actor: event.actor,
            attrs,
        };
        let start = self.pending.len();
        serde_json::to_writer(&mut self.pending, &record).expect("a record serialises");
        self.head = chain::line_hash(&self.pending[start..]);
        self.pending.push(b'\n');
        self.seq += 1;
        self.unchecked += 1;
    }

    /// Writes the pending lines and `fsync`s them.
    fn flush(&mut self) -> Result<(), JournalError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let path = self.dir.join(JOURNAL_FILE);
        self.file
            .write_all(&self.pending)
            .and_then(|_| self.file.sync_data())
            .map_err(JournalError::io(path))?;
        self.pending.clear();
        Ok(())
    }

    /// Appends a checkpoint record over every line before it, writes and `fsync`s, then
    /// replaces the `checkpoint` file: the note.
    fn checkpoint(&mut self) -> Result<String, JournalError> {
        if let (0, Some(latest)) = (self.unchecked, &self.latest) {
            return Ok(latest.clone());
        }
        let note = Checkpoint {
            origin: self.origin.clone(),
            size: self.seq,
            root: self.head,
        }
        .sign(&self.key);
        // The lines it covers and the checkpoint line go out in one write and one fsync: the
        // note is published (the `checkpoint` file, the API) only once all of it is on disk.
        self.encode(Event::new(crate::kinds::CHECKPOINT).attr(attr::CHECKPOINT_NOTE, note.clone()));
        self.flush()?;
        self.unchecked = 0;
        let path = self.dir.join(CHECKPOINT_FILE);
        let tmp = self.dir.join(".checkpoint.tmp");
        std::fs::write(&tmp, &note)
            .and_then(|_| File::open(&tmp)?.sync_all())
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(JournalError::io(path))?;
        if let Some(shared) = &self.shared {
            *shared.latest.lock().expect("latest") = Some(note.clone());
        }
        self.latest = Some(note.clone());
        Ok(note)
    }
}
