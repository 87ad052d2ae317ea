//! Routes for agent tasks. A task creates sandboxes and stores data host-wide, so only an
//! admin caller (the Unix socket, or an unscoped token) may run or read tasks.

use std::sync::Arc;

use futures::StreamExt;

use axum::{
    body::{Body, Bytes},
    extract::{Path, Query, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Extension, Json,
};
use hutch_api::ApiError;
use hutch_core::task::TaskError;
use hutch_task::{
    model::{encode_frame, FRAME_ERROR, FRAME_RECORD},
    sign::SignatureCheck,
    TaskRecord,
};
use hutch_types::ErrorCode;
use serde::Deserialize;

use super::{auth::Scope, error::HttpError, AppState};

type Result<T> = std::result::Result<T, HttpError>;

/// Why a label-scoped token is refused here.
const HOST_WIDE: &str = "tasks are host-wide: only an unscoped token may run or read them";

fn task_error(e: TaskError) -> HttpError {
    HttpError::new(e.code(), hutch_core::chain(&e))
}

/// Query of `POST /v1/tasks`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub(super) struct RunQuery {
    /// Answer with a stream of frames (`u8 kind ‖ u32 LE len ‖ bytes`): the agent's and the
    /// verify command's output as it comes (kinds 1, 2), then the record (3) or an error (4).
    #[serde(default)]
    stream: bool,
}

#[utoipa::path(post, path = "/v1/tasks", tag = "tasks", params(RunQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "u32 LE n, n bytes of JSON TaskSpec, then the workspace as a tar archive"),
    responses((status = 201, description = "the task ran; see its verdict", body = TaskRecord),
              (status = 200, description = "with stream=true: output frames, then the record frame", content_type = "application/octet-stream"),
              (status = 400, body = ApiError), (status = 403, body = ApiError)))]
pub(super) async fn run_task(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
    Query(query): Query<RunQuery>,
    body: Bytes,
) -> Result<Response> {
    scope.require_admin(HOST_WIDE)?;
    let (spec, tar) = hutch_task::model::decode_request(&body)
        .map_err(|e| HttpError::new(ErrorCode::BadRequest, e))?;
    let tar = tar.to_vec();
    let tasks = state.tasks.clone();
    let (sink, output) = tokio::sync::mpsc::channel(64);
    let sink = query.stream.then_some(sink);
    // Runs to its end even if the client hangs up, so no sandbox is left behind.
    let run = tokio::spawn(async move { tasks.run(spec, tar, sink).await });
    if !query.stream {
        let record = run
            .await
            .map_err(|e| HttpError::new(ErrorCode::Internal, format!("task failed: {e}")))?
            .map_err(task_error)?;
        return Ok((StatusCode::CREATED, Json(record)).into_response());
    }
    // Output frames until the task drops its sink, then the record (or the error).
    let frames = futures::stream::unfold((output, Some(run)), |(mut output, run)| async move {
        if let Some((kind, data)) = output.recv().await {
            return Some((encode_frame(kind, &data), (output, run)));
        }
        let last = match run?.await {
            Ok(Ok(record)) => encode_frame(
                FRAME_RECORD,
                &serde_json::to_vec(&record).expect("serializable"),
            ),
            Ok(Err(e)) => encode_frame(FRAME_ERROR, &error_json(task_error(e))),
            Err(e) => encode_frame(
                FRAME_ERROR,
                &error_json(HttpError::new(
                    ErrorCode::Internal,
                    format!("task failed: {e}"),
                )),
            ),
        };
        Some((last, (output, None)))
    })
    .map(|frame| Ok::<_, std::convert::Infallible>(Bytes::from(frame)));
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(Body::from_stream(frames))
        .expect("valid response"))
}

fn error_json(e: HttpError) -> Vec<u8> {
    serde_json::to_vec(&e.0).expect("serializable")
}

#[utoipa::path(get, path = "/v1/tasks", tag = "tasks",
    responses((status = 200, body = Vec<TaskRecord>), (status = 403, body = ApiError)))]
pub(super) async fn list_tasks(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
) -> Result<Json<Vec<TaskRecord>>> {
    scope.require_admin(HOST_WIDE)?;
    Ok(Json(state.tasks.list().map_err(task_error)?))
}

#[utoipa::path(get, path = "/v1/tasks/{id}", tag = "tasks", params(("id" = String, Path)),
    responses((status = 200, body = TaskRecord), (status = 404, body = ApiError)))]
pub(super) async fn get_task(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
) -> Result<Json<TaskRecord>> {
    scope.require_admin(HOST_WIDE)?;
    Ok(Json(state.tasks.get(&id).map_err(task_error)?))
}

#[utoipa::path(get, path = "/v1/tasks/{id}/signature", tag = "tasks", params(("id" = String, Path)),
    responses((status = 200, description = "whether the stored record, baseline and changeset are as the host signed them", body = SignatureCheck),
              (status = 404, body = ApiError)))]
pub(super) async fn task_signature(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
) -> Result<Json<SignatureCheck>> {
    scope.require_admin(HOST_WIDE)?;
    Ok(Json(state.tasks.verify_signature(&id).map_err(task_error)?))
}

#[utoipa::path(get, path = "/v1/tasks/{id}/baseline", tag = "tasks", params(("id" = String, Path)),
    responses((status = 200, description = "the baseline manifest (path → file or symlink)"),
              (status = 404, body = ApiError)))]
pub(super) async fn task_baseline(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
) -> Result<Json<hutch_task::Baseline>> {
    scope.require_admin(HOST_WIDE)?;
    Ok(Json(state.tasks.baseline(&id).map_err(task_error)?))
}

#[utoipa::path(get, path = "/v1/tasks/{id}/changeset", tag = "tasks", params(("id" = String, Path)),
    responses((status = 200, description = "the accepted changeset stream", content_type = "application/octet-stream"),
              (status = 404, body = ApiError)))]
pub(super) async fn task_changeset(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
) -> Result<Vec<u8>> {
    scope.require_admin(HOST_WIDE)?;
    state.tasks.changeset(&id).map_err(task_error)
}

#[utoipa::path(get, path = "/v1/tasks/{id}/diff", tag = "tasks", params(("id" = String, Path)),
    responses((status = 200, description = "unified diff against the baseline", content_type = "text/plain"),
              (status = 404, body = ApiError)))]
pub(super) async fn task_diff(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
) -> Result<String> {
    scope.require_admin(HOST_WIDE)?;
    state.tasks.diff(&id).map_err(task_error)
}
