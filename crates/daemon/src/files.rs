//! File routes: one file, or a tar archive of a directory tree, in and out of a sandbox.
//! Paths are guest paths.
//!
//! The transfer itself (caps, the archive checker in the stream, the guest's `tar`) is the
//! request surface's ([`hutch_core::service::transfer`]); these routes turn the request body
//! into its byte stream and its download pipe into the response body. A download's status is
//! decided by its first bytes: a failure before any is a JSON error, a later one aborts the
//! body.

use std::{future::Future, io, sync::Arc};

use axum::{
    body::Body,
    extract::State,
    http::{header, StatusCode},
    response::Response,
    Extension,
};
use futures::{StreamExt, TryStreamExt};
use hutch_core::service::{ByteStream, Caller};
use hutch_types::ErrorCode;
use serde::Deserialize;
use tokio::io::DuplexStream;
use tokio_util::io::ReaderStream;

use crate::{
    extract::{sandbox_id, Path, Query},
    http_error::HttpError,
    AppState,
};

/// Bytes a download buffers between the guest channel and the HTTP body.
const PIPE_BYTES: usize = 256 << 10;

type Result<T> = std::result::Result<T, HttpError>;

/// `?path=/abs/guest/path[&mode=644]`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct PathQuery {
    /// Absolute path in the guest.
    path: String,
    /// Octal permission bits for an uploaded file (default 644).
    mode: Option<String>,
}

/// The request body as the surface's byte stream.
pub(crate) fn upload(body: Body) -> ByteStream {
    Box::pin(body.into_data_stream().map_err(io::Error::other))
}

#[utoipa::path(put, path = "/v1/sandboxes/{id}/files", tag = "files", params(("id" = String, Path), PathQuery),
    request_body(content = inline(hutch_api::Binary), content_type = "application/octet-stream"),
    responses((status = 204, description = "written"), (status = 400, body = hutch_api::ApiError)))]
pub async fn put_file(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
    body: Body,
) -> Result<StatusCode> {
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
    state
        .api
        .write_file(&caller, &sandbox_id(&id)?, &q.path, mode, upload(body))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/files", tag = "files", params(("id" = String, Path), PathQuery),
    responses((status = 200, description = "file contents", body = inline(hutch_api::Binary), content_type = "application/octet-stream"),
              (status = 404, body = hutch_api::ApiError)))]
pub async fn get_file(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Response> {
    streamed("application/octet-stream", |sink| async move {
        Ok(state
            .api
            .read_file(&caller, &sandbox_id(&id)?, &q.path, sink)
            .await?)
    })
    .await
}

#[utoipa::path(put, path = "/v1/sandboxes/{id}/archive", tag = "files", params(("id" = String, Path), PathQuery),
    request_body(content = inline(hutch_api::Binary), content_type = "application/x-tar"),
    responses((status = 204, description = "unpacked into path"), (status = 400, body = hutch_api::ApiError)))]
pub async fn put_archive(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
    body: Body,
) -> Result<StatusCode> {
    state
        .api
        .put_archive(&caller, &sandbox_id(&id)?, &q.path, upload(body))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/archive", tag = "files", params(("id" = String, Path), PathQuery),
    responses((status = 200, description = "tar of the directory (guest-made: check before unpacking)", body = inline(hutch_api::Binary), content_type = "application/x-tar"),
              (status = 400, body = hutch_api::ApiError)))]
pub async fn get_archive(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Response> {
    streamed("application/x-tar", |sink| async move {
        Ok(state
            .api
            .get_archive(&caller, &sandbox_id(&id)?, &q.path, sink)
            .await?)
    })
    .await
}

/// Answers with what `produce` writes into its pipe, streamed. The status is decided by the
/// first bytes: if `produce` fails before writing any, the answer is its JSON error; once the
/// body has started, a later failure aborts it.
pub(crate) async fn streamed<F, Fut>(content_type: &'static str, produce: F) -> Result<Response>
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

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

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

    #[test]
    fn file_bodies_are_documented_as_binary_strings() {
        let doc = serde_json::to_value(crate::routes::api_doc()).unwrap();
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
}
