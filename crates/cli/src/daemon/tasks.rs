//! Routes for agent tasks. A task creates sandboxes and stores data host-wide, so only an
//! admin caller (the Unix socket, or an unscoped token) may run or read tasks.

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
    response::IntoResponse,
    Extension, Json,
};
use hutch_api::ApiError;
use hutch_core::task::TaskError;
use hutch_task::TaskRecord;
use hutch_types::ErrorCode;

use super::{auth::Scope, error::HttpError, AppState};

type Result<T> = std::result::Result<T, HttpError>;

/// Why a label-scoped token is refused here.
const HOST_WIDE: &str = "tasks are host-wide: only an unscoped token may run or read them";

fn task_error(e: TaskError) -> HttpError {
    HttpError::new(e.code(), hutch_core::chain(&e))
}

#[utoipa::path(post, path = "/v1/tasks", tag = "tasks",
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "u32 LE n, n bytes of JSON TaskSpec, then the workspace as a tar archive"),
    responses((status = 201, description = "the task ran; see its verdict", body = TaskRecord),
              (status = 400, body = ApiError), (status = 403, body = ApiError)))]
pub(super) async fn run_task(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
    body: Bytes,
) -> Result<impl IntoResponse> {
    scope.require_admin(HOST_WIDE)?;
    let (spec, tar) = hutch_task::model::decode_request(&body)
        .map_err(|e| HttpError::new(ErrorCode::BadRequest, e))?;
    let tar = tar.to_vec();
    let tasks = state.tasks.clone();
    // Runs to its end even if the client hangs up, so no sandbox is left behind.
    let record = tokio::spawn(async move { tasks.run(spec, tar).await })
        .await
        .map_err(|e| HttpError::new(ErrorCode::Internal, format!("task failed: {e}")))?
        .map_err(task_error)?;
    Ok((StatusCode::CREATED, Json(record)))
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
