//! Files in and out of a sandbox: one file, or a tar archive of a directory tree. Paths are
//! guest paths.
//!
//! Bodies stream both ways with bounded memory. Downloads go from the guest channel through a
//! small pipe ([`PIPE_BYTES`]) to the HTTP body: a client that reads slowly fills the pipe,
//! the channel stops granting the guest credit, and the guest stops sending. Uploads go from
//! the request body to the guest chunk by chunk. Size caps are enforced as bytes flow: crossing
//! one stops the transfer at once (a JSON error if the response has not started, an aborted
//! body if it has). Archives are checked entry by entry as they pass, both ways: a refused
//! upload kills the guest's `tar` (entries before the bad one may already be unpacked in the
//! guest), a refused download is cut off (clients check again before unpacking).

use std::{future::Future, io, sync::Arc};

use axum::{
    body::{Body, Bytes},
    extract::State,
    http::{header, StatusCode},
    response::Response,
    Extension,
};
use futures::{SinkExt, Stream, StreamExt};
use hutch_protocol::{
    host::{Channel, ChannelError, Exec, ExecControl, ExecEvent},
    ExitStatus, ReadFileRequest, WriteFileRequest,
};
use hutch_types::{ErrorCode, SandboxInfo};
use serde::Deserialize;
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio_util::io::{ReaderStream, StreamReader, SyncIoBridge};

use super::{
    auth::Scope,
    error::{exec_start_error, HttpError},
    extract::{Path, Query},
    routes::{authorize, exec_request, MAX_UPLOAD},
    AppState,
};

/// Largest download (one file or one archive).
pub const MAX_DOWNLOAD: u64 = 256 << 20;

/// Bytes a download buffers between the guest channel and the HTTP body.
const PIPE_BYTES: usize = 256 << 10;

/// Most bytes of a guest `tar`'s stderr kept for an error message.
const STDERR_KEPT: usize = 64 << 10;

type Result<T> = std::result::Result<T, HttpError>;

/// `?path=/abs/guest/path[&mode=644]`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct PathQuery {
    /// Absolute path in the guest.
    path: String,
    /// Octal permission bits for an uploaded file (default 644).
    mode: Option<String>,
}

/// What every file route needs: the sandbox (in the caller's scope), the checked guest path,
/// and the channel to its agent.
async fn target(
    state: &AppState,
    scope: &Scope,
    id: &str,
    raw: &str,
) -> Result<(SandboxInfo, String, Arc<Channel>)> {
    let info = authorize(state, scope, id).await?;
    let path = guest_path(raw)?;
    let channel = state.manager.channel(id).await?;
    Ok((info, path, channel))
}

/// An absolute, normalised guest path without `..`.
fn guest_path(raw: &str) -> Result<String> {
    let bad = || {
        HttpError::new(
            ErrorCode::UnsafePath,
            format!("guest path {raw:.80} must be absolute, without `..` or NUL"),
        )
    };
    if !raw.starts_with('/') || raw.contains('\0') || raw.split('/').any(|c| c == "..") {
        return Err(bad());
    }
    let parts: Vec<&str> = raw
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    Ok(format!("/{}", parts.join("/")))
}

#[utoipa::path(put, path = "/v1/sandboxes/{id}/files", tag = "files", params(("id" = String, Path), PathQuery),
    request_body(content = inline(hutch_api::Binary), content_type = "application/octet-stream"),
    responses((status = 204, description = "written"), (status = 400, body = hutch_api::ApiError)))]
pub async fn put_file(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
    body: Body,
) -> Result<StatusCode> {
    let (_, path, channel) = target(&state, &scope, &id, &q.path).await?;
    let mode = match q.mode.as_deref() {
        None => 0o644,
        Some(m) => u32::from_str_radix(m, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| {
                HttpError::new(
                    ErrorCode::BadRequest,
                    format!("mode {m:.10} is not octal permission bits"),
                )
            })?,
    };
    let req = WriteFileRequest {
        path,
        mode,
        make_parents: true,
    };
    match channel
        .write_file(req, StreamReader::new(capped(body)))
        .await
    {
        Err(ChannelError::Local(e)) => Err(body_error(e)),
        done => done.map(drop).map_err(HttpError::from),
    }?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/files", tag = "files", params(("id" = String, Path), PathQuery),
    responses((status = 200, description = "file contents", body = inline(hutch_api::Binary), content_type = "application/octet-stream"),
              (status = 404, body = hutch_api::ApiError)))]
pub async fn get_file(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Response> {
    let (_, path, channel) = target(&state, &scope, &id, &q.path).await?;
    let req = ReadFileRequest {
        path,
        max_bytes: MAX_DOWNLOAD,
    };
    streamed("application/octet-stream", |sink| async move {
        channel.read_file(req, sink).await?;
        Ok(())
    })
    .await
}

#[utoipa::path(put, path = "/v1/sandboxes/{id}/archive", tag = "files", params(("id" = String, Path), PathQuery),
    request_body(content = inline(hutch_api::Binary), content_type = "application/x-tar"),
    responses((status = 204, description = "unpacked into path"), (status = 400, body = hutch_api::ApiError)))]
pub async fn put_archive(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
    body: Body,
) -> Result<StatusCode> {
    let (info, dir, channel) = target(&state, &scope, &id, &q.path).await?;
    let script = "mkdir -p -- \"$1\" && exec tar -x -p --no-same-owner -C \"$1\" -f -";
    let argv = ["sh", "-c", script, "sh", &dir].map(String::from).to_vec();
    let req = exec_request(&info, argv, Default::default(), None, None, true)?;
    let exec = channel.exec(req).await.map_err(exec_start_error)?;
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
    let (status, stderr) = exited
        .await
        .map_err(|e| HttpError::new(ErrorCode::Internal, format!("unpack task failed: {e}")))??;
    verdict?;
    guest_succeeded(status, &stderr, "unpacking the archive")?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/archive", tag = "files", params(("id" = String, Path), PathQuery),
    responses((status = 200, description = "tar of the directory (guest-made: check before unpacking)", body = inline(hutch_api::Binary), content_type = "application/x-tar"),
              (status = 400, body = hutch_api::ApiError)))]
pub async fn get_archive(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Response> {
    let (info, dir, channel) = target(&state, &scope, &id, &q.path).await?;
    let argv = ["tar", "-c", "-C", &dir, "."].map(String::from).to_vec();
    let req = exec_request(&info, argv, Default::default(), None, None, false)?;
    let exec = channel.exec(req).await.map_err(exec_start_error)?;
    streamed("application/x-tar", |sink| pack(exec, sink, dir)).await
}

/// A request body that ran over [`MAX_UPLOAD`].
#[derive(Debug, thiserror::Error)]
#[error("the request body is over {MAX_UPLOAD} bytes")]
struct BodyTooLarge;

/// The request body as a stream of chunks that fails as soon as it passes [`MAX_UPLOAD`].
fn capped(body: Body) -> impl Stream<Item = io::Result<Bytes>> + Send + Unpin + 'static {
    let mut total = 0usize;
    body.into_data_stream().map(move |chunk| {
        let chunk = chunk.map_err(io::Error::other)?;
        total += chunk.len();
        if total > MAX_UPLOAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, BodyTooLarge));
        }
        Ok(chunk)
    })
}

/// A request body that broke off or ran over its cap.
fn body_error(e: io::Error) -> HttpError {
    HttpError::new(ErrorCode::BadRequest, format!("request body: {e}"))
}

/// Whether `e` (or what it wraps) is [`BodyTooLarge`].
fn is_too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.is::<BodyTooLarge>() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io.get_ref().is_some_and(|inner| inner.is::<BodyTooLarge>()) {
                return true;
            }
        }
        next = e.source();
    }
    false
}

/// Answers with what `produce` writes into its pipe, streamed. The status is decided by the
/// first bytes: if `produce` fails before writing any, the answer is its JSON error; once the
/// body has started, a later failure aborts it.
async fn streamed<F, Fut>(content_type: &'static str, produce: F) -> Result<Response>
where
    F: FnOnce(DuplexStream) -> Fut,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let (sink, source) = tokio::io::duplex(PIPE_BYTES);
    let done = tokio::spawn(produce(sink));
    let mut chunks = ReaderStream::new(source);
    let Some(first) = chunks.next().await else {
        // Nothing was written: the producer is done, and its result is the answer.
        outcome(done).await?;
        return Ok(binary(content_type, Body::empty()));
    };
    let first = first.map_err(|e| HttpError::new(ErrorCode::Internal, e.to_string()))?;
    let end = futures::stream::once(async move {
        outcome(done).await.err().map(|e| {
            tracing::debug!(error = %e.0.message, "download cut off");
            Err(io::Error::other(e.0.message))
        })
    })
    .filter_map(futures::future::ready);
    let body = futures::stream::once(futures::future::ready(Ok(first)))
        .chain(chunks)
        .chain(end);
    Ok(binary(content_type, Body::from_stream(body)))
}

/// A 200 answer with `body` of `content_type`.
fn binary(content_type: &'static str, body: Body) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .body(body)
        .expect("valid response")
}

/// The result of a spawned producer.
async fn outcome(done: tokio::task::JoinHandle<Result<()>>) -> Result<()> {
    done.await
        .map_err(|e| HttpError::new(ErrorCode::Internal, format!("transfer task failed: {e}")))?
}

/// Copies the guest `tar`'s output into `sink` through a [`TarGate`], so only checked entries
/// reach the client; kills the `tar` as soon as its output passes [`MAX_DOWNLOAD`], the check
/// refuses an entry, or the client stops reading.
async fn pack(exec: Exec, mut sink: DuplexStream, dir: String) -> Result<()> {
    let ctl = exec.control();
    let (input, output) = futures::channel::mpsc::channel(4);
    let produced = tokio::spawn(tar_output(exec, input, dir));
    let mut gate = TarGate::start(output);
    while let Some(chunk) = gate.passed.recv().await {
        if sink.write_all(&chunk).await.is_err() {
            kill(&ctl).await;
            return Err(HttpError::new(
                ErrorCode::BadRequest,
                "the client stopped reading",
            ));
        }
    }
    let verdict = gate.verdict().await;
    let produced = produced
        .await
        .map_err(|e| HttpError::new(ErrorCode::Internal, format!("pack task failed: {e}")))?;
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
                    return Err(HttpError::new(
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

/// A tar stream checked entry by entry as it flows: [`crate::archive::check_each`] reads it on
/// a blocking thread, and only bytes that belong to entries it has passed come out of
/// `passed` (the header being judged is held back), so a refused entry never reaches the
/// other side. Queues are a few chunks long: memory stays bounded whatever the size.
struct TarGate {
    /// The checked bytes, in order; ends when the input does or the check refuses.
    passed: tokio::sync::mpsc::Receiver<Bytes>,
    verdict: tokio::task::JoinHandle<std::result::Result<usize, crate::archive::ArchiveError>>,
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
            let entries = crate::archive::check_each(&mut recording, |end| {
                let mut s = state.borrow_mut();
                s.safe_until = end;
                s.release();
            })?;
            // All checked: the end-of-archive blocks, and whatever follows, pass as they are.
            state.borrow_mut().safe_until = u64::MAX;
            state.borrow_mut().release();
            io::copy(&mut recording, &mut io::sink())
                .map_err(crate::archive::ArchiveError::Malformed)?;
            Ok(entries)
        });
        TarGate { passed, verdict }
    }

    /// The check's verdict, once `passed` has ended.
    async fn verdict(self) -> Result<()> {
        drop(self.passed);
        match self.verdict.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if is_too_large(&e) => {
                Err(HttpError::new(ErrorCode::BadRequest, hutch_core::chain(&e)))
            }
            Ok(Err(e)) => Err(HttpError::new(ErrorCode::UnsafePath, hutch_core::chain(&e))),
            Err(e) => Err(HttpError::new(
                ErrorCode::Internal,
                format!("archive check failed: {e}"),
            )),
        }
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
    Err(HttpError::new(
        ErrorCode::ExecFailed,
        format!("{what} in the guest failed ({status:?}): {text}"),
    ))
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
        let refused = verdict.unwrap_err().0;
        assert_eq!(refused.code, ErrorCode::UnsafePath, "{}", refused.message);
        assert_eq!(
            passed,
            evil[..512],
            "only the checked first entry passes: {}",
            refused.message
        );
    }

    #[tokio::test]
    async fn a_failure_before_the_first_byte_is_an_api_error_and_after_it_cuts_the_body() {
        let early = streamed("application/octet-stream", |_sink| async {
            Err(HttpError::new(ErrorCode::NotFound, "gone"))
        })
        .await;
        assert_eq!(early.err().map(|e| e.0.code), Some(ErrorCode::NotFound));
        let late = streamed("application/octet-stream", |mut sink| async move {
            sink.write_all(b"partial").await.unwrap();
            Err(HttpError::new(ErrorCode::BadRequest, "over the cap"))
        })
        .await
        .expect("the answer started");
        assert!(axum::body::to_bytes(late.into_body(), 1 << 20)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn an_upload_stops_at_the_chunk_that_crosses_the_cap() {
        let mib = Bytes::from(vec![0u8; 1 << 20]);
        let chunks = (0..(MAX_UPLOAD >> 20) + 8).map(move |_| Ok::<_, io::Error>(mib.clone()));
        let mut body = capped(Body::from_stream(futures::stream::iter(chunks)));
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
    fn file_bodies_are_documented_as_binary_strings() {
        let doc = serde_json::to_value(super::super::routes::api_doc()).unwrap();
        let binary =
            |schema: &serde_json::Value| schema["type"] == "string" && schema["format"] == "binary";
        for (route, method, media) in [
            ("files", "put", "application/octet-stream"),
            ("archive", "put", "application/x-tar"),
        ] {
            let op = &doc["paths"][format!("/v1/sandboxes/{{id}}/{route}")][method];
            let schema = &op["requestBody"]["content"][media]["schema"];
            assert!(binary(schema), "{method} {route} request: {op}");
        }
        for (route, media) in [
            ("files", "application/octet-stream"),
            ("archive", "application/x-tar"),
        ] {
            let op = &doc["paths"][format!("/v1/sandboxes/{{id}}/{route}")]["get"];
            let schema = &op["responses"]["200"]["content"][media]["schema"];
            assert!(binary(schema), "get {route} response: {op}");
        }
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
