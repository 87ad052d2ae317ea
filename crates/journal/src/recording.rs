//! Where session recordings go: one file per exec, named by the BLAKE3 of its bytes
//! (`<journal dir>/recordings/<blake3>.cast`), so the journal's `exec.end` record names it and
//! anyone can check it, and it lives and goes with its journal (retention removes both).
//!
//! A [`Recorder`] encodes events on the caller's side (cheap: a UTF-8 check and JSON
//! escaping) and hashes the lines as they are made, so the digest is known the moment the exec
//! ends; one writer thread ([`Recordings`]) does all file I/O. Nothing the guest sends names a
//! file: a recording is written under a random name and renamed to its digest. Memory stays
//! bounded: each recording keeps at most its cap of data, and lines waiting for the writer are
//! capped host-wide ([`MAX_QUEUED`]); a recording that would pass that is cut with a marker
//! rather than slow the exec down.

use std::{
    collections::HashMap,
    fs::File,
    io::{BufWriter, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::oneshot;

use crate::{
    cast::{CastEncoder, Header, Source},
    JournalError, Redactor,
};

/// The directory of a journal's recordings.
pub const RECORDINGS_DIR: &str = "recordings";
/// Data recorded per exec by default (output, input and resizes): 16 MiB.
pub const DEFAULT_CAP: u64 = 16 << 20;
/// Bytes of recordings waiting for the writer, host-wide, past which recordings are cut.
pub const MAX_QUEUED: usize = 64 << 20;
/// The size a recording without a terminal says it has.
const NO_TTY: (u16, u16) = (80, 24);
/// The marker of a recording cut because the writer fell behind.
const WRITER_BEHIND: &str = "hutch: recording stopped: the writer fell behind";

/// The file of the recording with BLAKE3 `digest` in the journal directory `dir`; `None` if
/// `digest` is not 64 lower-case hex digits (so it can never name another file).
pub fn recording_path(dir: &Path, digest: &str) -> Option<PathBuf> {
    let hex = digest.len() == 64
        && digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    hex.then(|| dir.join(RECORDINGS_DIR).join(format!("{digest}.cast")))
}

/// What the writer thread is asked to do.
enum Message {
    Open(u64, PathBuf),
    Line(u64, Vec<u8>),
    Finish(u64, String),
    Discard(u64),
    Sync(oneshot::Sender<()>),
}

/// What recorders and the writer share.
#[derive(Debug, Default)]
struct Shared {
    queued: AtomicUsize,
    write_errors: AtomicU64,
}

/// The recordings of this host: the writer thread and the cap each recording gets.
#[derive(Debug)]
pub struct Recordings {
    tx: mpsc::Sender<Message>,
    shared: Arc<Shared>,
    cap: u64,
}

impl Recordings {
    /// Starts the writer thread; each recording keeps at most `cap` bytes of data.
    pub fn new(cap: u64) -> Recordings {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let theirs = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("hutch-recordings".into())
            .spawn(move || serve(rx, &theirs));
        if let Err(e) = spawned {
            // Every recording's lines are then lost (and counted) rather than the execs.
            tracing::warn!(error = %e, "no recording writer");
        }
        Recordings { tx, shared, cap }
    }

    /// The same recordings, each keeping at most `cap` bytes of data.
    pub fn with_cap(mut self, cap: u64) -> Recordings {
        self.cap = cap;
        self
    }

    /// Starts recording an exec into the journal directory `dir`; `tty` is its terminal's
    /// size (columns, rows), if it has one (only then is input recorded). The secrets of
    /// `redactor` are replaced in everything recorded.
    pub fn start(&self, dir: &Path, tty: Option<(u16, u16)>, redactor: Redactor) -> Recorder {
        let id = rand::random::<u64>();
        let (width, height) = tty.unwrap_or(NO_TTY);
        let timestamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
        let header = Header {
            version: 2,
            width,
            height,
            timestamp,
        }
        .line();
        let mut live = Live {
            id,
            tty: tty.is_some(),
            started: Instant::now(),
            encoder: CastEncoder::new(self.cap).redacting(redactor),
            hasher: blake3::Hasher::new(),
            bytes: 0,
            tx: self.tx.clone(),
            shared: self.shared.clone(),
            summary: None,
        };
        live.send(Message::Open(id, dir.join(RECORDINGS_DIR)));
        live.emit(header);
        Recorder(Arc::new(Mutex::new(live)))
    }

    /// Waits until every recording finished so far is in its file.
    pub async fn sync(&self) -> Result<(), JournalError> {
        let (reply, done) = oneshot::channel();
        self.tx
            .send(Message::Sync(reply))
            .map_err(|_| JournalError::Stopped)?;
        done.await.map_err(|_| JournalError::Stopped)
    }

    /// Lines lost and files that could not be written since the start.
    pub fn write_errors(&self) -> u64 {
        self.shared.write_errors.load(Ordering::Relaxed)
    }
}

/// How a recording ended, for the exec's journal record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// BLAKE3 of the file (hex): its name.
    pub digest: String,
    /// The file's size.
    pub bytes: u64,
    /// Whether it was cut (its cap, or a writer that fell behind).
    pub truncated: bool,
    /// Bytes of data seen but not recorded.
    pub dropped: u64,
}

/// One exec's recording in progress; clones share it (output comes from one task, input and
/// resizes from another).
#[derive(Clone)]
pub struct Recorder(Arc<Mutex<Live>>);

impl Recorder {
    /// Records output of the process (stdout or stderr).
    pub fn output(&self, source: Source, data: &[u8]) {
        self.with(|live, t, out| live.encoder.data(t, source, data, out));
    }

    /// Records input typed into the process's terminal (nothing without a terminal).
    pub fn input(&self, data: &[u8]) {
        self.with(|live, t, out| {
            if live.tty {
                live.encoder.data(t, Source::Input, data, out)
            }
        });
    }

    /// Records a resize of the terminal to `cols` × `rows`.
    pub fn resize(&self, cols: u16, rows: u16) {
        self.with(|live, t, out| live.encoder.resize(t, cols, rows, out));
    }

    /// Ends the recording (later calls answer the same): its digest, size and whether it was
    /// cut. The file is written soon after; [`Recordings::sync`] waits for it.
    pub fn finish(&self) -> Summary {
        let mut live = self.0.lock().expect("recorder");
        if let Some(summary) = &live.summary {
            return summary.clone();
        }
        let mut out = Vec::new();
        let t = live.started.elapsed();
        live.encoder.flush(t, &mut out);
        live.emit(out);
        let summary = Summary {
            digest: live.hasher.finalize().to_hex().to_string(),
            bytes: live.bytes,
            truncated: live.encoder.truncated(),
            dropped: live.encoder.dropped(),
        };
        let id = live.id;
        live.send(Message::Finish(id, summary.digest.clone()));
        live.summary = Some(summary.clone());
        summary
    }

    fn with(&self, f: impl FnOnce(&mut Live, Duration, &mut Vec<u8>)) {
        let mut live = self.0.lock().expect("recorder");
        if live.summary.is_some() {
            return;
        }
        let mut out = Vec::new();
        let t = live.started.elapsed();
        f(&mut live, t, &mut out);
        if !out.is_empty() {
            live.emit(out);
        }
    }
}

/// A recording in progress.
struct Live {
    id: u64,
    tty: bool,
    started: Instant,
    encoder: CastEncoder,
    hasher: blake3::Hasher,
    bytes: u64,
    tx: mpsc::Sender<Message>,
    shared: Arc<Shared>,
    summary: Option<Summary>,
}

impl Live {
    /// Hashes `lines` and hands them to the writer; when the writer is too far behind, cuts
    /// the recording with a marker instead.
    fn emit(&mut self, mut lines: Vec<u8>) {
        let queued = self.shared.queued.load(Ordering::Relaxed);
        if queued + lines.len() > MAX_QUEUED {
            lines.clear();
            let t = self.started.elapsed();
            self.encoder.cut(t, WRITER_BEHIND, &mut lines);
            if lines.is_empty() {
                return;
            }
        }
        self.hasher.update(&lines);
        self.bytes += lines.len() as u64;
        self.shared.queued.fetch_add(lines.len(), Ordering::Relaxed);
        self.send(Message::Line(self.id, lines));
    }

    fn send(&self, message: Message) {
        if self.tx.send(message).is_err() {
            self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        if self.summary.is_none() {
            self.send(Message::Discard(self.id));
        }
    }
}

/// A recording's file while it is written.
struct Part {
    file: BufWriter<File>,
    temp: PathBuf,
    dir: PathBuf,
}

impl Part {
    fn create(dir: PathBuf, id: u64) -> std::io::Result<Part> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        let temp = dir.join(format!(".{id:016x}.part"));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        Ok(Part {
            file: BufWriter::new(file),
            temp,
            dir,
        })
    }

    /// Makes the file durable under its digest (the same bytes, if one is there already).
    fn finish(mut self, digest: &str) -> std::io::Result<()> {
        self.file.flush()?;
        self.file.get_ref().sync_data()?;
        std::fs::rename(&self.temp, self.dir.join(format!("{digest}.cast")))
    }
}

/// The writer thread: serves messages until every sender is gone.
fn serve(rx: mpsc::Receiver<Message>, shared: &Shared) {
    let mut open: HashMap<u64, Part> = HashMap::new();
    let failed = |what: &str, e: std::io::Error| {
        shared.write_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, "recording: {what} failed");
    };
    for message in rx {
        match message {
            Message::Open(id, dir) => match Part::create(dir, id) {
                Ok(part) => {
                    open.insert(id, part);
                }
                Err(e) => failed("creating the file", e),
            },
            Message::Line(id, lines) => {
                shared.queued.fetch_sub(lines.len(), Ordering::Relaxed);
                let Some(part) = open.get_mut(&id) else {
                    continue;
                };
                if let Err(e) = part.file.write_all(&lines) {
                    failed("writing", e);
                    discard(open.remove(&id));
                }
            }
            Message::Finish(id, digest) => {
                if let Some(part) = open.remove(&id) {
                    let temp = part.temp.clone();
                    if let Err(e) = part.finish(&digest) {
                        failed("finishing", e);
                        let _ = std::fs::remove_file(temp);
                    }
                }
            }
            Message::Discard(id) => discard(open.remove(&id)),
            Message::Sync(reply) => {
                let _ = reply.send(());
            }
        }
    }
}

fn discard(part: Option<Part>) {
    if let Some(part) = part {
        let _ = std::fs::remove_file(&part.temp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cast::{parse, CastEvent};

    #[test]
    fn only_a_digest_names_a_recording() {
        let dir = Path::new("/j");
        let digest = "ab".repeat(32);
        assert_eq!(
            recording_path(dir, &digest).unwrap(),
            Path::new("/j/recordings").join(format!("{digest}.cast"))
        );
        for bad in ["../../etc/passwd", "", &"AB".repeat(32), &"a".repeat(65)] {
            assert!(recording_path(dir, bad).is_none(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_finished_recording_is_the_file_its_digest_names() {
        let dir = tempfile::tempdir().unwrap();
        let recordings = Recordings::new(DEFAULT_CAP);
        let rec = recordings.start(dir.path(), Some((100, 30)), Redactor::default());
        rec.output(Source::Stdout, b"$ ");
        rec.input(b"echo hi\r");
        rec.resize(120, 40);
        rec.output(Source::Stdout, b"hi\r\n");
        let summary = rec.finish();
        assert_eq!(rec.finish(), summary, "finishing twice answers the same");
        recordings.sync().await.unwrap();

        let path = recording_path(dir.path(), &summary.digest).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(blake3::hash(&bytes).to_hex().as_str(), summary.digest);
        assert_eq!(bytes.len() as u64, summary.bytes);
        assert!(!summary.truncated);
        let (header, events) = parse(&bytes).unwrap();
        assert_eq!((header.width, header.height), (100, 30));
        assert!(header.timestamp.is_some());
        let codes: Vec<_> = events
            .iter()
            .map(|CastEvent(_, c, d)| (c.as_str(), d.as_str()))
            .collect();
        assert_eq!(
            codes,
            [
                ("o", "$ "),
                ("i", "echo hi\r"),
                ("r", "120x40"),
                ("o", "hi\r\n")
            ]
        );
        assert!(
            events.windows(2).all(|w| w[0].0 <= w[1].0),
            "times never go back"
        );
        // Only the finished file is left: no temporary part.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    #[tokio::test]
    async fn without_a_terminal_input_is_not_recorded_and_the_size_is_80x24() {
        let dir = tempfile::tempdir().unwrap();
        let recordings = Recordings::new(DEFAULT_CAP);
        let rec = recordings.start(dir.path(), None, Redactor::default());
        rec.input(b"secret stdin");
        rec.output(Source::Stderr, b"err");
        let summary = rec.finish();
        recordings.sync().await.unwrap();
        let bytes = std::fs::read(recording_path(dir.path(), &summary.digest).unwrap()).unwrap();
        let (header, events) = parse(&bytes).unwrap();
        assert_eq!((header.width, header.height), (80, 24));
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].2, "err");
    }

    #[tokio::test]
    async fn a_capped_recording_says_so_and_its_file_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let recordings = Recordings::new(DEFAULT_CAP).with_cap(1000);
        let rec = recordings.start(dir.path(), None, Redactor::default());
        for _ in 0..100 {
            rec.output(Source::Stdout, &[b'x'; 100]);
        }
        let summary = rec.finish();
        recordings.sync().await.unwrap();
        assert!(summary.truncated);
        assert_eq!(summary.dropped, 100 * 100 - 1000);
        assert!(summary.bytes < 2000, "{}", summary.bytes);
        let bytes = std::fs::read(recording_path(dir.path(), &summary.digest).unwrap()).unwrap();
        let (_, events) = parse(&bytes).unwrap();
        let last = events.last().unwrap();
        assert_eq!(last.1, "m");
        assert!(last.2.starts_with(crate::cast::TRUNCATED_MARKER));
    }

    #[tokio::test]
    async fn an_abandoned_recording_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let recordings = Recordings::new(DEFAULT_CAP);
        let rec = recordings.start(dir.path(), None, Redactor::default());
        rec.output(Source::Stdout, b"x");
        drop(rec);
        recordings.sync().await.unwrap();
        let left = std::fs::read_dir(dir.path().join(RECORDINGS_DIR))
            .unwrap()
            .count();
        assert_eq!(left, 0);
    }
}
