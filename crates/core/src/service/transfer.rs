//! Files in and out of a sandbox: one file, or a tar archive of a directory tree, streamed
//! both ways with bounded memory whatever the front end.
//!
//! Uploads arrive as a [`ByteStream`] and go to the guest chunk by chunk; [`capped`] stops one
//! at the chunk that crosses [`MAX_UPLOAD`]. Downloads are written into a pipe the front end
//! reads: a reader that is slow fills the pipe, the channel stops granting the guest credit,
//! and the guest stops sending. Archives are checked entry by entry as they pass, both ways,
//! by one checker ([`hutch_task::archive::check_each`]): a refused upload kills the guest's
//! `tar` (entries before the bad one may already be unpacked in the guest), a refused
//! download is cut off (clients check again before unpacking).

use std::{io, pin::Pin};

use bytes::Bytes;
use futures::{SinkExt, Stream, StreamExt};
use hutch_protocol::{
    host::{Channel, ChannelError, Exec, ExecControl, ExecEvent},
    ExecRequest, ExitStatus, ReadFileRequest, WriteFileRequest,
};
use hutch_task::archive::ArchiveError;
use hutch_types::ErrorCode;
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio_util::io::{StreamReader, SyncIoBridge};

use super::ServiceError;

type Result<T> = std::result::Result<T, ServiceError>;

/// Largest upload (one file or one archive).
pub const MAX_UPLOAD: usize = 256 << 20;

/// Largest download (one file or one archive).
pub const MAX_DOWNLOAD: u64 = 256 << 20;

/// Most bytes of a guest `tar`'s stderr kept for an error message.
const STDERR_KEPT: usize = 64 << 10;

/// An upload's bytes as they arrive.
pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// An upload that ran over [`MAX_UPLOAD`].
#[derive(Debug, thiserror::Error)]
#[error("the upload is over {MAX_UPLOAD} bytes")]
pub struct TooLarge;

/// `body` as a stream that fails as soon as it passes [`MAX_UPLOAD`].
pub fn capped(body: ByteStream) -> impl Stream<Item = io::Result<Bytes>> + Send + Unpin {
    let mut total = 0usize;
    body.map(move |chunk| {
        let chunk = chunk?;
        total += chunk.len();
        if total > MAX_UPLOAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, TooLarge));
        }
        Ok(chunk)
    })
}

/// Whether `e` (or what it wraps) is [`TooLarge`].
pub fn is_too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.is::<TooLarge>() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io.get_ref().is_some_and(|inner| inner.is::<TooLarge>()) {
                return true;
            }
        }
        next = e.source();
    }
    false
}

/// An absolute, normalised guest path without `..`.
pub fn guest_path(raw: &str) -> Result<String> {
    if !raw.starts_with('/') || raw.contains('\0') || raw.split('/').any(|c| c == "..") {
        return Err(ServiceError::refused(
            ErrorCode::UnsafePath,
            format!("guest path {raw:.80} must be absolute, without `..` or NUL"),
        ));
    }
    let parts: Vec<&str> = raw
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    Ok(format!("/{}", parts.join("/")))
}

/// Writes `body` to the guest file `path` with `mode`, creating parent directories.
pub async fn write_file(
    channel: &Channel,
    path: String,
    mode: u32,
    body: ByteStream,
) -> Result<()> {
    let req = WriteFileRequest {
        path,
        mode,
        make_parents: true,
    };
    match channel
        .write_file(req, StreamReader::new(capped(body)))
        .await
    {
        Err(ChannelError::Local(e)) => Err(ServiceError::refused(
            ErrorCode::BadRequest,
            format!("request body: {e}"),
        )),
        done => done.map(drop).map_err(ServiceError::from),
    }
}

/// Copies the guest file `path` into `sink`, at most [`MAX_DOWNLOAD`] bytes.
pub async fn read_file(channel: &Channel, path: String, sink: DuplexStream) -> Result<()> {
    let req = ReadFileRequest {
        path,
        max_bytes: MAX_DOWNLOAD,
    };
    channel.read_file(req, sink).await?;
    Ok(())
}

/// Unpacks the tar `body` into the guest directory `dir` (made if missing) with the guest's
/// `tar`, passing only entries the checker accepts. `req` runs the unpacking.
pub async fn put_archive(channel: &Channel, req: ExecRequest, body: ByteStream) -> Result<()> {
    let exec = channel.exec(req).await.map_err(ServiceError::exec_start)?;
    let ctl = exec.control();
    let exited = tokio::spawn(exit_and_stderr(exec));
    let mut gate = TarGate::start(capped(body));
    while let Some(chunk) = gate.passed.recv().await {
        if ctl.write_stdin(&chunk).await.is_err() {
            // The guest's tar is gone; its exit status says why.
            break;
        }
    }
    let verdict = gate.verdict().await;
    match verdict {
        // A guest tar that already exited has no stdin to close; its status says why.
        Ok(()) => drop(ctl.close_stdin().await),
        Err(_) => kill(&ctl).await,
    }
    let (status, stderr) = exited.await.map_err(|e| {
        ServiceError::refused(ErrorCode::Internal, format!("unpack task failed: {e}"))
    })??;
    verdict?;
    guest_succeeded(status, &stderr, "unpacking the archive")
}

/// The guest command that unpacks an archive into `dir`.
pub fn unpack_argv(dir: &str) -> Vec<String> {
    let script = "mkdir -p -- \"$1\" && exec tar -x -p --no-same-owner -C \"$1\" -f -";
    ["sh", "-c", script, "sh", dir].map(String::from).to_vec()
}

/// The guest command that packs `dir` into an archive on its stdout.
pub fn pack_argv(dir: &str) -> Vec<String> {
    ["tar", "-c", "-C", dir, "."].map(String::from).to_vec()
}

/// Runs `req` (a guest `tar` packing `dir`) and copies its output into `sink` through a
/// [`TarGate`], so only checked entries come out; kills the `tar` as soon as its output
/// passes [`MAX_DOWNLOAD`], the check refuses an entry, or the reader stops reading.
pub async fn get_archive(
    channel: &Channel,
    req: ExecRequest,
    dir: String,
    mut sink: DuplexStream,
) -> Result<()> {
    let exec = channel.exec(req).await.map_err(ServiceError::exec_start)?;
    let ctl = exec.control();
    let (input, output) = futures::channel::mpsc::channel(4);
    let produced = tokio::spawn(tar_output(exec, input, dir));
    let mut gate = TarGate::start(output);
    while let Some(chunk) = gate.passed.recv().await {
        if sink.write_all(&chunk).await.is_err() {
            kill(&ctl).await;
            return Err(ServiceError::refused(
                ErrorCode::BadRequest,
                "the client stopped reading",
            ));
        }
    }
    let verdict = gate.verdict().await;
    let produced = produced.await.map_err(|e| {
        ServiceError::refused(ErrorCode::Internal, format!("pack task failed: {e}"))
    })?;
    verdict?;
    let (status, stderr) = produced?;
    guest_succeeded(status, &stderr, "packing the archive")
}

/// Feeds a guest `tar`'s stdout into `input` until it exits; its status and (the start of)
/// its stderr. Past [`MAX_DOWNLOAD`] bytes it kills the `tar` and fails at once; once the check
/// stops taking input (it refused the archive) it kills the `tar` and waits for its exit.
async fn tar_output(
    mut exec: Exec,
    mut input: futures::channel::mpsc::Sender<io::Result<Bytes>>,
    dir: String,
) -> Result<(ExitStatus, Vec<u8>)> {
    let ctl = exec.control();
    let (mut total, mut stderr, mut refused) = (0u64, Vec::new(), false);
    loop {
        match exec.next_event().await? {
            ExecEvent::Stdout(d) => {
                total += d.len() as u64;
                if total > MAX_DOWNLOAD {
                    kill(&ctl).await;
                    return Err(ServiceError::refused(
                        ErrorCode::BadRequest,
                        format!("{dir} packs to more than {MAX_DOWNLOAD} bytes"),
                    ));
                }
                if !refused && input.send(Ok(Bytes::from(d))).await.is_err() {
                    refused = true;
                    kill(&ctl).await;
                }
            }
            ExecEvent::Stderr(d) => keep(&mut stderr, &d),
            ExecEvent::Exited(exit) => return Ok((exit.status, stderr)),
        }
    }
}

/// Waits for a guest process to exit, keeping the start of its stderr.
async fn exit_and_stderr(mut exec: Exec) -> Result<(ExitStatus, Vec<u8>)> {
    let mut stderr = Vec::new();
    loop {
        match exec.next_event().await? {
            ExecEvent::Stdout(_) => {}
            ExecEvent::Stderr(d) => keep(&mut stderr, &d),
            ExecEvent::Exited(exit) => return Ok((exit.status, stderr)),
        }
    }
}

/// Appends `data` to `buf` up to [`STDERR_KEPT`] bytes in all.
fn keep(buf: &mut Vec<u8>, data: &[u8]) {
    let room = STDERR_KEPT.saturating_sub(buf.len());
    buf.extend_from_slice(&data[..data.len().min(room)]);
}

/// Kills a guest helper whose transfer was refused (best effort: it may have exited).
async fn kill(ctl: &ExecControl) {
    if let Err(e) = ctl.signal(libc::SIGKILL).await {
        tracing::debug!(error = %e, "could not kill the guest's tar");
    }
}

/// Maps a failed guest helper command to an error quoting (a little of) its stderr.
fn guest_succeeded(status: ExitStatus, stderr: &[u8], what: &str) -> Result<()> {
    if status == ExitStatus::Code(0) {
        return Ok(());
    }
    let text: String = String::from_utf8_lossy(stderr)
        .chars()
        .filter(|c| !c.is_control())
        .take(300)
        .collect();
    Err(ServiceError::refused(
        ErrorCode::ExecFailed,
        format!("{what} in the guest failed ({status:?}): {text}"),
    ))
}

/// A tar stream checked entry by entry as it flows: [`hutch_task::archive::check_each`] reads it on
/// a blocking thread, and only bytes that belong to entries it has passed come out of
/// `passed` (the header being judged is held back), so a refused entry never reaches the
/// other side. Queues are a few chunks long: memory stays bounded whatever the size.
struct TarGate {
    /// The checked bytes, in order; ends when the input does or the check refuses.
    passed: tokio::sync::mpsc::Receiver<Bytes>,
    verdict: tokio::task::JoinHandle<std::result::Result<usize, ArchiveError>>,
}

/// The gate's state on the checking thread.
struct Held {
    out: tokio::sync::mpsc::Sender<Bytes>,
    /// Stream offset just past the last byte read.
    pos: u64,
    /// Bytes read but not yet passed, ending at `pos`.
    held: Vec<u8>,
    /// Every byte before this offset belongs to a checked entry.
    safe_until: u64,
}

impl Held {
    /// Passes on the held bytes that lie before `safe_until`. A receiver that is gone (the
    /// other side stopped) only means nobody wants them; the check goes on.
    fn release(&mut self) {
        let start = self.pos - self.held.len() as u64;
        let n = (self.safe_until.saturating_sub(start)).min(self.held.len() as u64) as usize;
        if n > 0 {
            let chunk = Bytes::copy_from_slice(&self.held[..n]);
            self.held.drain(..n);
            let _ = self.out.blocking_send(chunk);
        }
    }
}

/// A reader that records what it reads into the shared [`Held`].
struct Recording<R> {
    inner: R,
    state: std::rc::Rc<std::cell::RefCell<Held>>,
}

impl<R: io::Read> io::Read for Recording<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut state = self.state.borrow_mut();
        state.held.extend_from_slice(&buf[..n]);
        state.pos += n as u64;
        state.release();
        Ok(n)
    }
}

impl TarGate {
    fn start(input: impl Stream<Item = io::Result<Bytes>> + Send + Unpin + 'static) -> TarGate {
        let (out, passed) = tokio::sync::mpsc::channel(4);
        let reader = SyncIoBridge::new(StreamReader::new(input));
        let verdict = tokio::task::spawn_blocking(move || {
            let state = std::rc::Rc::new(std::cell::RefCell::new(Held {
                out,
                pos: 0,
                held: Vec::new(),
                safe_until: 0,
            }));
            let mut recording = Recording {
                inner: reader,
                state: state.clone(),
            };
            let entries = hutch_task::archive::check_each(&mut recording, |end| {
                let mut s = state.borrow_mut();
                s.safe_until = end;
                s.release();
            })?;
            // All checked: the end-of-archive blocks, and whatever follows, pass as they are.
            state.borrow_mut().safe_until = u64::MAX;
            state.borrow_mut().release();
            io::copy(&mut recording, &mut io::sink()).map_err(ArchiveError::Malformed)?;
            Ok(entries)
        });
        TarGate { passed, verdict }
    }

    /// The check's verdict, once `passed` has ended.
    async fn verdict(self) -> Result<()> {
        drop(self.passed);
        match self.verdict.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if is_too_large(&e) => Err(ServiceError::refused(
                ErrorCode::BadRequest,
                crate::chain(&e),
            )),
            Ok(Err(e)) => Err(ServiceError::refused(
                ErrorCode::UnsafePath,
                crate::chain(&e),
            )),
            Err(e) => Err(ServiceError::refused(
                ErrorCode::Internal,
                format!("archive check failed: {e}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything `tar` lets through the gate when fed in 100-byte chunks, and the verdict.
    async fn through_the_gate(tar: Vec<u8>) -> (Vec<u8>, Result<()>) {
        let chunks: Vec<io::Result<Bytes>> = tar
            .chunks(100)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let mut gate = TarGate::start(futures::stream::iter(chunks));
        let mut passed = Vec::new();
        while let Some(chunk) = gate.passed.recv().await {
            passed.extend_from_slice(&chunk);
        }
        (passed, gate.verdict().await)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_tar_gate_passes_checked_entries_and_holds_back_a_bad_one() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1000);
        h.set_mode(0o644);
        b.append_data(&mut h, "dir/file", &[7u8; 1000][..]).unwrap();
        let good = b.into_inner().unwrap();
        let (passed, verdict) = through_the_gate(good.clone()).await;
        assert!(verdict.is_ok());
        assert_eq!(passed, good, "a good archive passes byte for byte");

        // The second entry climbs out through the first; its header must never pass.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, "up", "/").unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(4);
        h.set_mode(0o644);
        b.append_data(&mut h, "up/evil", &b"evil"[..]).unwrap();
        let evil = b.into_inner().unwrap();
        let (passed, verdict) = through_the_gate(evil.clone()).await;
        let refused = verdict.unwrap_err();
        assert_eq!(refused.code(), ErrorCode::UnsafePath, "{refused}");
        assert_eq!(
            passed,
            evil[..512],
            "only the checked first entry passes: {refused}"
        );
    }

    #[tokio::test]
    async fn an_upload_stops_at_the_chunk_that_crosses_the_cap() {
        let mib = Bytes::from(vec![0u8; 1 << 20]);
        let chunks = (0..(MAX_UPLOAD >> 20) + 8).map(move |_| Ok::<_, io::Error>(mib.clone()));
        let mut body = capped(Box::pin(futures::stream::iter(chunks)));
        let mut passed = 0;
        let err = loop {
            match body.next().await {
                Some(Ok(chunk)) => passed += chunk.len(),
                Some(Err(e)) => break e,
                None => panic!("the whole body passed"),
            }
        };
        assert_eq!(passed, MAX_UPLOAD);
        assert!(is_too_large(&err), "{err}");
    }

    #[test]
    fn guest_paths_are_normalised_and_escapes_refused() {
        assert_eq!(guest_path("/root//a/./b/").unwrap(), "/root/a/b");
        assert_eq!(guest_path("/").unwrap(), "/");
        for bad in ["relative", "/a/../../etc", "/x\0y", ""] {
            assert!(guest_path(bad).is_err(), "{bad:?} accepted");
        }
    }
}
