//! Files in and out of a sandbox: one file, or a tar archive of a directory tree. Paths are
//! guest paths; archives going in are checked on the host first, archives coming out are
//! guest-made and capped (the client checks them again before unpacking).

use std::sync::Arc;

use axum::{body::Bytes, extract::State, http::StatusCode, Extension};
use hutch_protocol::{host::Channel, ExitStatus, ReadFileRequest, WriteFileRequest};
use hutch_types::{ErrorCode, SandboxInfo};
use serde::Deserialize;

use super::{
    auth::Scope,
    error::HttpError,
    extract::{Path, Query},
    routes::{authorize, collect, exec_request},
    AppState,
};

/// Largest download (one file or one archive).
pub const MAX_DOWNLOAD: u64 = 256 << 20;

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
fn target(
    state: &AppState,
    scope: &Scope,
    id: &str,
    raw: &str,
) -> Result<(SandboxInfo, String, Arc<Channel>)> {
    let info = authorize(state, scope, id)?;
    let path = guest_path(raw)?;
    let channel = state.manager.channel(id)?;
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
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 204, description = "written"), (status = 400, body = hutch_api::ApiError)))]
pub async fn put_file(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
    body: Bytes,
) -> Result<StatusCode> {
    let (_, path, channel) = target(&state, &scope, &id, &q.path)?;
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
    channel
        .write_file(
            WriteFileRequest {
                path,
                mode,
                make_parents: true,
            },
            &body[..],
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/files", tag = "files", params(("id" = String, Path), PathQuery),
    responses((status = 200, description = "file contents", content_type = "application/octet-stream"),
              (status = 404, body = hutch_api::ApiError)))]
pub async fn get_file(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Vec<u8>> {
    let (_, path, channel) = target(&state, &scope, &id, &q.path)?;
    let mut out = Vec::new();
    channel
        .read_file(
            ReadFileRequest {
                path,
                max_bytes: MAX_DOWNLOAD,
            },
            &mut out,
        )
        .await?;
    Ok(out)
}

#[utoipa::path(put, path = "/v1/sandboxes/{id}/archive", tag = "files", params(("id" = String, Path), PathQuery),
    request_body(content = Vec<u8>, content_type = "application/x-tar"),
    responses((status = 204, description = "unpacked into path"), (status = 400, body = hutch_api::ApiError)))]
pub async fn put_archive(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
    body: Bytes,
) -> Result<StatusCode> {
    let (info, dir, channel) = target(&state, &scope, &id, &q.path)?;
    crate::archive::check(&body)
        .map_err(|e| HttpError::new(ErrorCode::UnsafePath, hutch_core::chain(&e)))?;
    let script = "mkdir -p -- \"$1\" && exec tar -x -p --no-same-owner -C \"$1\" -f -";
    let argv = ["sh", "-c", script, "sh", &dir].map(String::from).to_vec();
    let req = exec_request(&info, argv, Default::default(), None, None, true)?;
    let out = collect(&channel, req, Some(body.to_vec()), 64 << 10).await?;
    guest_succeeded(out.exit.status, &out.stderr, "unpacking the archive")?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/archive", tag = "files", params(("id" = String, Path), PathQuery),
    responses((status = 200, description = "tar of the directory (guest-made: check before unpacking)", content_type = "application/x-tar"),
              (status = 400, body = hutch_api::ApiError)))]
pub async fn get_archive(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Vec<u8>> {
    let (info, dir, channel) = target(&state, &scope, &id, &q.path)?;
    let argv = ["tar", "-c", "-C", &dir, "."].map(String::from).to_vec();
    let req = exec_request(&info, argv, Default::default(), None, None, false)?;
    let out = collect(&channel, req, None, MAX_DOWNLOAD as usize).await?;
    if out.truncated {
        return Err(HttpError::new(
            ErrorCode::BadRequest,
            format!("{dir} packs to more than {MAX_DOWNLOAD} bytes"),
        ));
    }
    guest_succeeded(out.exit.status, &out.stderr, "packing the archive")?;
    Ok(out.stdout)
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

    #[test]
    fn guest_paths_are_normalised_and_escapes_refused() {
        assert_eq!(guest_path("/root//a/./b/").unwrap(), "/root/a/b");
        assert_eq!(guest_path("/").unwrap(), "/");
        for bad in ["relative", "/a/../../etc", "/x\0y", ""] {
            assert!(guest_path(bad).is_err(), "{bad:?} accepted");
        }
    }
}
